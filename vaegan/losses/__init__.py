"""vaegan's built-in loss terms, registered in ``setup.cfg`` like any third-party plugin."""
