"""Thin adapters between the pure-PyTorch core and Ray / MLflow. The core never imports these."""
