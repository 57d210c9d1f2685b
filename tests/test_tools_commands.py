"""The tools' commands are in `jcaffe help`, each with its own flags, and exported lazily."""

import pytest

from jcaffe import cli

TOOLS = ["parse_log", "plot_training_log", "draw_net", "classify", "extract_features"]


def test_help_lists_the_tools(capsys):
    assert cli.main(["help"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ") and line.strip()}
    assert set(TOOLS) <= listed


@pytest.mark.parametrize("name, flag", [("parse_log", "--delimiter"), ("plot_training_log", "CHART_TYPE"),
                                        ("draw_net", "--rankdir"), ("classify", "--center_only"),
                                        ("extract_features", "--backend")])
def test_command_help(capsys, name, flag):
    assert cli.main(["help", name]) == 0
    assert flag in capsys.readouterr().out


def test_lazy_exports():
    import jcaffe
    import jcaffe.classifier

    assert jcaffe.Classifier is jcaffe.classifier.Classifier
    assert "Classifier" in dir(jcaffe) and "net_spec" in dir(jcaffe)
