"""Peer implementations of jcaffe's benchmark nets in other frameworks (optional extras)."""
