"""An example third-party vaegan plugin package: a gradient-difference loss and an MLP discriminator.

Nothing here is imported by vaegan until a config names one of the plugins (entry points are read
from metadata; loading a name imports only that plugin's module).
"""

__version__ = "0.1.0"
