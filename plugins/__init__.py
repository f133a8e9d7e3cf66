"""vaegan's first-party plugins (installed as ``vaegan_plugins``), registered through entry points
in vaegan's ``setup.cfg`` exactly as a third-party package registers its own.

Modules (entry-point names in brackets; see docs/plugins.md for every option):

- :mod:`.patchgan` [``patchgan``], :mod:`.dcgan` [``dcgan``]: discriminators.
- :mod:`.adversarial` [``hinge``, ``least_squares``]: GAN loss pairs.
- :mod:`.r1` [``r1``], :mod:`.lecam` [``lecam``]: discriminator regularisers (R1 gradient penalty, LeCam).
- :mod:`.feature_matching` [``feature_matching``]: Larsen et al.'s learned similarity.
- :mod:`.perceptual` [``lpips``, with the shift-tolerant networks of :mod:`._stlpips`], :mod:`.ssim`
  [``ssim``], :mod:`.frequency` [``focal_frequency``]: perceptual and structural reconstruction losses.
- :mod:`.shards` [``webdataset``], :mod:`.hf_datasets` [``hf_datasets``]: datasets in WebDataset tar shards and
  Hugging Face datasets (map-style or streamed), split across ranks and data workers by :mod:`._streaming`.

Nothing is imported here: loading one plugin by name imports only its module.
"""
