"""An example third-party vaegan plugin package: one plugin of three of vaegan's five groups.

- ``resmlp`` (``vaegan.generators``, :class:`~vaegan_plugin_example.generators.ResMLPVAE`): a VAE whose
  encoder and decoder are residual MLPs with LayerNorm; any image shape, a vector latent.
- ``gradient_difference`` (``vaegan.losses``,
  :class:`~vaegan_plugin_example.losses.GradientDifferenceLoss`): a generator term matching image edges.
- ``mlp`` (``vaegan.discriminators``, :class:`~vaegan_plugin_example.discriminators.MLPDiscriminator`):
  a one-hidden-layer fully connected discriminator.

Each module imports its contract from :mod:`vaegan.api` only. Nothing here is imported by vaegan until
a config names one of the plugins (entry points are read from metadata; loading a name imports only
that plugin's module).
"""

__version__ = "0.2.0"
