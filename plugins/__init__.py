"""vaegan's first-party plugins (installed as ``vaegan_plugins``), registered through entry points
in vaegan's ``setup.cfg`` exactly as a third-party package registers its own."""
