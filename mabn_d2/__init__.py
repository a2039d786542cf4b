"""MABN for detectron2."""
