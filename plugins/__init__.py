"""vaegan's first-party plugins (installed as ``vaegan_plugins``), registered through entry points
in vaegan's ``setup.cfg`` exactly as a third-party package registers its own.

Modules (entry-point names in brackets; see docs/plugins.md for every option):

- :mod:`.autoencoder_kl` [``autoencoder_kl``]: the LDM / Stable Diffusion spatial KL autoencoder; from and to
  diffusers with :mod:`.diffusers_io` [``diffusers_vae``], from and to one LDM/ComfyUI file with
  :mod:`.ldm_checkpoint` [``ldm_vae``].
- :mod:`.gmm` [``gmm``], :mod:`.two_stage` [``two_stage``]: latent samplers (a Gaussian mixture; a second-stage VAE).
- :mod:`.patchgan` [``patchgan``], :mod:`.dcgan` [``dcgan``]: discriminators.
- :mod:`.adversarial` [``hinge``, ``least_squares``]: GAN loss pairs.
- :mod:`.r1` [``r1``], :mod:`.lecam` [``lecam``]: discriminator regularisers (R1 gradient penalty, LeCam).
- :mod:`.feature_matching` [``feature_matching``]: Larsen et al.'s learned similarity.
- :mod:`.perceptual` [``lpips``, with the shift-tolerant networks of :mod:`._stlpips`], :mod:`.ssim`
  [``ssim``], :mod:`.frequency` [``focal_frequency``]: perceptual and structural reconstruction losses.
- :mod:`.shards` [``webdataset``], :mod:`.hf_datasets` [``hf_datasets``]: datasets in WebDataset tar shards and
  Hugging Face datasets (map-style or streamed), split across ranks and data workers by :mod:`._streaming`.

Where a built-in lives: ``vaegan/`` holds the core objective (reconstruction, KL, smoothness) and one
reference plugin per group in pure torch (``conv``/``mlp``, ``non_saturating``, ``simple``, ``normal``,
``mnist``/``image_folder``); everything else is here, written against :mod:`vaegan.api` as a third party would.

Nothing is imported here: loading one plugin by name imports only its module.
"""
