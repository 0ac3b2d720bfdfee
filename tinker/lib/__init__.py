"""Tinker's `tinker.lib` namespace: the client implementations live in lib.public_interfaces."""
