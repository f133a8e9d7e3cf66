"""The generator contract: a VAE whose latent may have any shape, and its save/load without pickle.

A generator plugin (group ``vaegan.generators``) subclasses :class:`VAE` and supplies four things:

- ``encode(x)``: a :class:`DiagonalGaussian` posterior over a latent of shape ``(B, *latent_shape)``
  (``self.posterior(moments)`` turns a ``(B, 2c, ...)`` tensor into one);
- ``decode_logits(z)``: the decoder's pre-activation images ``(B, C, H, W)``;
- ``last_layer``: the decoder's last weight (the adaptive GAN weight compares gradient norms there);
- ``latent_shape`` (set in ``__init__``), and optionally ``sample_prior`` (default: N(0, I)), ``activate``
  (default: sigmoid or tanh by the output range) and ``save_extra_formats`` (another library's copy of
  the saved model).

Everything else is a template method of this class and is not overridden: above all :meth:`VAE.forward`,
the one call that training makes through the prepared (DDP-wrapped, autocast) module and that returns
reconstruction, posterior, latent and every extra decode the loss terms asked for, so DDP all-reduces
every generator gradient and nothing calls ``.module.encode`` around the wrapper.

A generator is constructed as ``cls(image_shape=(C, H, W), output_range=..., **options)``. Its constructor
arguments are recorded (as diffusers' ``ConfigMixin`` does) in :attr:`VAE.config`, a
:class:`~vaegan.config.ModelConfig`, which :meth:`VAE.save_pretrained` writes as ``config.json`` next
to ``model.safetensors``; :meth:`VAE.from_pretrained` rebuilds the generator through the registry, so
a saved model never runs code that is not an installed plugin.

Example:
    >>> vae = build_generator(ModelConfig(options={"latent_dim": 8}))
    >>> out = vae(torch.rand(4, 1, 28, 28))
    >>> out.recon.shape, out.z.shape, vae.latent_shape
    (torch.Size([4, 1, 28, 28]), torch.Size([4, 8]), (8,))
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .distributions import DiagonalGaussian, VAEOutput  # defined there; this module's names since 0.2
from ._deprecation import deprecated_names, warn_deprecated
from .errors import CheckpointError, ConfigError, DataError, PluginError, ResourceError
from .files import check_finite as _check_finite
from .files import mb, safetensors_shapes, shape_differences

__all__ = ["DiagonalGaussian", "VAEOutput", "VAE", "build_generator", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GROUP = "vaegan.generators"


class _GeneratorMeta(abc.ABCMeta):
    """Records every generator's constructor arguments in ``config`` (so any instance can be saved and
    rebuilt by name), and keeps vaegan 0.1's ``VAE(ModelConfig(...))`` working with a warning.

    An ``ABCMeta``, so a plugin's own abstract base (``class MyBase(VAE, abc.ABC)``) has no metaclass conflict."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is VAE:
            if len(args) == 1 and not kwargs and isinstance(args[0], ModelConfig):
                warn_deprecated("VAE(config) is deprecated; use vaegan.build_generator(config), which builds "
                                f"the generator plugin config.name ('{args[0].name}') through the registry.")
                return build_generator(args[0])
            raise TypeError("VAE is the base class of generators; build one with vaegan.build_generator(config) "
                            "or subclass it (see vaegan.api).")
        obj = super().__call__(*args, **kwargs)
        if not isinstance(getattr(obj, "latent_shape", None), tuple):
            raise PluginError(f"Generator {cls.__module__}.{cls.__qualname__} did not set self.latent_shape to a "
                              "tuple in __init__ (e.g. (16,) for a vector latent, (4, 8, 8) for a spatial one).")
        options = _bound_options(cls, args, kwargs)
        from . import registry  # a plugin module imports this one: no module-level import cycle

        obj.config = ModelConfig(name=registry.name_of(GROUP, cls) or "", image_channels=obj.image_shape[0],
                                 image_size=obj.image_shape[1:], output_range=obj.output_range, options=options)
        return obj


def _bound_options(cls: type, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The constructor arguments (defaults filled in) other than the shared image fields, as plain data."""
    from .config import to_dict

    signature = inspect.signature(cls.__init__)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    options: Dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            options.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL and name not in ("image_shape", "output_range"):
            options[name] = value
    return to_dict(options)


class VAE(nn.Module, metaclass=_GeneratorMeta):
    """Base class of every generator: a VAE with a diagonal Gaussian posterior over a latent of any shape.

    Args:
        image_shape: (C, H, W) of the images it encodes and decodes.
        output_range: ``"unit"`` (sigmoid, [0, 1]) or ``"symmetric"`` (tanh, [-1, 1]).
        logvar_range: Clamp of the posterior log-variance (``exp(-30)`` keeps the std > 0, ``exp(20)``
            keeps fp16/bf16 activations finite).

    Attributes:
        latent_shape: The latent's shape without the batch, set by the subclass: ``(D,)`` or ``(c, h, w)``.
        config: A :class:`~vaegan.config.ModelConfig` with the plugin's name and constructor options.

    Raises:
        TypeError: a subclass overrides ``forward`` (the template method training relies on).
    """

    latent_shape: Tuple[int, ...]
    config: ModelConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            raise TypeError(f"{cls.__qualname__} overrides VAE.forward: implement encode, decode_logits and "
                            "last_layer instead, so the one training forward keeps returning everything.")
        # inspect.signature(cls) would otherwise show the metaclass's (*args, **kwargs): the registry checks
        # a config's options against this signature before building anything.
        init = inspect.signature(cls.__init__)
        cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])

    def __init__(self, image_shape: Tuple[int, int, int], output_range: str = "unit",
                 logvar_range: Tuple[float, float] = (-30.0, 20.0)) -> None:
        super().__init__()
        if output_range not in ("unit", "symmetric"):
            raise ConfigError(f"model.output_range must be 'unit' or 'symmetric', got {output_range!r}.")
        if not logvar_range[0] < logvar_range[1]:
            raise ConfigError(f"The posterior's log-variance clamp needs min < max, got {tuple(logvar_range)}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.output_range = output_range
        self.value_range = (0.0, 1.0) if output_range == "unit" else (-1.0, 1.0)
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))

    # ---- what a subclass supplies ------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:  # pragma: no cover - abstract
        """q(z|x) for images ``x`` of shape (B, C, H, W)."""
        raise NotImplementedError

    def decode_logits(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The decoder's pre-activation output (B, C, H, W) for latents (B, *latent_shape)."""
        raise NotImplementedError

    @property
    def last_layer(self) -> Tensor:  # pragma: no cover - abstract
        """The decoder's last weight: where the adaptive adversarial weight compares gradients."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the weights are (and the inputs must go)."""
        return next(self.parameters()).device

    def sample_prior(self, n: int, *, generator: Optional[torch.Generator] = None,
                     device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``n`` latents (n, *latent_shape) from the prior, N(0, I) unless a subclass says otherwise."""
        return torch.randn((n, *self.latent_shape), generator=generator, device=device, dtype=dtype)

    # ---- helpers for subclasses ---------------------------------------------------------------
    def posterior(self, moments: Tensor) -> DiagonalGaussian:
        """Split encoder output (B, 2c, ...) along dim 1 into mean and log-variance, in fp32, clamped."""
        mean, logvar = moments.float().chunk(2, dim=1)  # posterior math in fp32 under autocast
        return DiagonalGaussian(mean, logvar.clamp(*self.logvar_range))

    def activate(self, logits: Tensor) -> Tensor:
        """Map decoder pre-activations into the output range (sigmoid or tanh; a subclass may decide
        otherwise, e.g. the identity of diffusers' VAEs)."""
        return torch.sigmoid(logits) if self.output_range == "unit" else torch.tanh(logits)

    def save_extra_formats(self, directory: Path) -> None:
        """Called by :meth:`save_pretrained` after vaegan's own files are written: a subclass may write
        the same model in another library's format there (``autoencoder_kl`` writes a diffusers folder)."""

    # ---- template methods --------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in the output range for latents ``z`` (B, *latent_shape)."""
        return self.activate(self.decode_logits(z))

    def forward(self, x: Tensor, perturb_std: float = 0.0, num_prior: int = 0, decoder_only: bool = False,
                num_aggregate: int = 0, bandwidth: float = 0.5) -> VAEOutput:
        """Encode, sample, decode; optionally decode a perturbed latent, prior samples, samples of the
        aggregate posterior, and a copy of the reconstruction whose gradient reaches only the decoder.

        Args:
            x: Images (B, C, H, W) in the output range.
            perturb_std: When > 0, also decode ``z + perturb_std * u`` with ``u ~ N(0, I)``.
            num_prior: When > 0, also decode that many latents from the prior.
            decoder_only: Also decode ``z.detach()`` (same values as ``recon``, no encoder gradient).
            num_aggregate: When > 0, also decode that many draws of a Gaussian kernel density of the batch's
                posterior means (detached: no encoder gradient): the region a fitted sampler draws from.
            bandwidth: The kernels' standard deviation, per latent element, as a fraction of the means' spread.

        Returns:
            A :class:`VAEOutput`; ``recon`` is ``activate(recon_logits)``: in the output range when the
            activation bounds it (sigmoid, tanh; not the identity of diffusers-style decoders).
        """
        posterior = self.encode(x)
        z = posterior.rsample()
        zs = [z]
        if decoder_only:
            zs.append(z.detach())
        delta = None
        if perturb_std > 0:
            delta = perturb_std * torch.randn_like(z)
            zs.append(z + delta)
        if num_prior > 0:
            zs.append(self.sample_prior(num_prior, device=z.device, dtype=z.dtype))
        if num_aggregate > 0:
            means = posterior.mean.detach().to(z.dtype)  # (B, *latent_shape)
            pick = means[torch.randint(means.shape[0], (num_aggregate,), device=z.device)]
            spread = means.std(dim=0, keepdim=True) if means.shape[0] > 1 else torch.ones_like(means[:1])
            zs.append(pick + bandwidth * spread * torch.randn_like(pick))
        # One decoder call for all latents: one kernel launch per layer instead of three.
        logits = self.decode_logits(torch.cat(zs))
        images = self.activate(logits)
        b = x.shape[0]
        out = VAEOutput(recon=images[:b], posterior=posterior, z=z, recon_logits=logits[:b])
        offset = b
        if decoder_only:
            out.recon_decoder_only = images[offset : offset + b]
            offset += b
        if delta is not None:
            out.perturbed, out.perturbation = images[offset : offset + b], delta
            offset += b
        if num_prior > 0:
            out.prior_samples = images[offset : offset + num_prior]
            offset += num_prior
        if num_aggregate > 0:
            out.aggregate_samples = images[offset:]
        return out

    @torch.no_grad()
    def reconstruct(self, x: Tensor, sample: bool = False) -> Tensor:
        """Reconstruct images; uses the posterior mean unless ``sample`` is True.

        The latents are decoded as contiguous tensors, as :func:`vaegan.codec.decode` gets them from a file,
        so reconstructing equals encoding then decoding pixel for pixel (a spatial posterior's mean is a
        strided view, and a convolution's last bit can depend on the input's strides)."""
        q = self.encode(x)
        return self.decode((q.rsample() if sample else q.mean).contiguous())

    @torch.no_grad()
    def sample(self, n: int, temperature: Optional[float] = None, generator: Optional[torch.Generator] = None,
               sampler: Any = None) -> Tensor:
        """Draw ``n`` images (n, C, H, W): latents from ``sampler``, decoded.

        Args:
            n: Images to draw.
            temperature: The latents' spread (default: the sampler's own, saved with it; 1.0 for the prior).
            generator: Seeds the draw (the same images for the same seed).
            sampler: None: the model folder's default sampler when the model was loaded with
                :meth:`from_pretrained` from a folder that has one (fitted at the end of training or by
                ``vaegan fit-sampler``), as ``vaegan sample`` does, else the prior N(0, I); ``"normal"``: the
                prior; another name: that sampler of the folder; or a fitted
                :class:`~vaegan.samplers.LatentSampler`.

        Raises:
            CheckpointError: a named sampler that the model folder does not have.

        Example:
            >>> VAE.from_pretrained("outputs/vaegan_mnist/final").sample(16)  # its 'gmm' sampler  # doctest: +SKIP
        """
        p = next(self.parameters())
        chosen = self._sampler(sampler)
        if chosen is None:
            # Drawn where the generator lives (a CPU generator cannot fill a CUDA tensor), then moved.
            z = self.sample_prior(n, generator=generator,
                                  device=generator.device if generator is not None else p.device)
            z = z * (1.0 if temperature is None else temperature)
        else:
            from .samplers import sample_latents

            z = sample_latents(self, n, generator=generator, temperature=temperature, sampler=chosen)  # CPU
        return self.decode(z.to(p.device, p.dtype))

    def _sampler(self, sampler: Any):
        """The :class:`~vaegan.samplers.LatentSampler` that :meth:`sample` draws from, or None for the prior."""
        from .samplers import default_sampler_name, load_sampler

        if sampler is not None and not isinstance(sampler, str):
            return sampler
        folder = getattr(self, "_pretrained_dir", None)
        name = sampler if sampler is not None else (default_sampler_name(folder) if folder is not None else "normal")
        if name == "normal":
            return None
        if folder is None:
            raise CheckpointError(f"sample(sampler={name!r}) reads a fitted sampler from the model's folder, but this "
                                  "model was not loaded with VAE.from_pretrained: pass a LatentSampler instead "
                                  "(vaegan.samplers.load_sampler), or sampler='normal' for N(0, I).")
        cache = self.__dict__.setdefault("_samplers", {})  # loaded once per name
        if name not in cache:
            cache[name] = load_sampler(folder, name, self.latent_shape)
        return cache[name]

    @torch.no_grad()
    def interpolate(self, x0: Tensor, x1: Tensor, steps: int = 8) -> Tensor:
        """Decode ``steps`` points on the line between the posterior means of x0 and x1.

        Args:
            x0, x1: Images (B, C, H, W).
        Returns:
            (B, steps, C, H, W) images; index 0 is near x0 and index -1 near x1.
        """
        return self.decode_path(self.encode(x0).mean, self.encode(x1).mean, steps)

    @torch.no_grad()
    def decode_path(self, z0: Tensor, z1: Tensor, steps: int = 8) -> Tensor:
        """Decode ``steps`` evenly spaced points from latents ``z0`` to ``z1`` (each (B, *latent_shape)).

        Returns:
            (B, steps, C, H, W) images.
        """
        t = torch.linspace(0, 1, steps, device=z0.device).view(1, steps, *([1] * (z0.ndim - 1)))
        z = torch.lerp(z0.unsqueeze(1), z1.unsqueeze(1), t.to(z0.dtype))  # (B, steps, *latent_shape)
        return self.decode(z.flatten(0, 1)).unflatten(0, (z0.shape[0], steps))

    def check_images(self, x: Tensor, where: str = "the data") -> None:
        """Raise :class:`DataError` unless ``x`` is a (B, C, H, W) batch this model accepts."""
        want = self.image_shape
        if x.numel() == 0:
            raise DataError(f"{where} gave an empty batch; the dataset must contain images.")
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(
                f"Images from {where} have shape {tuple(x.shape[1:]) if x.ndim == 4 else tuple(x.shape)}"
                f" but the model expects (C, H, W) = {want}. Set model.image_channels and "
                "model.image_size to match the data, or resize/convert the images."
            )
        if not torch.isfinite(x).all():
            raise DataError(f"Images from {where} contain NaN or infinite pixels; clean the data.")
        low, high = self.value_range
        lo, hi = float(x.min()), float(x.max())
        if lo < low - 1e-3 or hi > high + 1e-3:
            raise DataError(
                f"Pixels from {where} span [{lo:.3g}, {hi:.3g}] but the model's output range is "
                f"[{low:g}, {high:g}] (model.output_range='{self.output_range}'). Rescale "
                "the data or change model.output_range."
            )

    # ---- serialisation -----------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write ``config.json`` (the plugin name, its options, the image fields) and
        ``model.safetensors`` (no pickle) into ``directory``.

        Raises:
            PluginError: the generator's class is not a registered plugin, so it could not be rebuilt.
        """
        from .config import to_dict
        from .files import save_safetensors, write_text_atomic

        if not self.config.name:
            raise PluginError(
                f"{type(self).__qualname__} is not registered in '{GROUP}', so a saved copy could not be rebuilt by "
                "name. Register it with an entry point (or vaegan.registry.register for a notebook) first.")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(state, d / WEIGHTS_NAME, metadata={"format": "pt", "library": "vaegan",
                                                            "generator": self.config.name})
        write_text_atomic(d / CONFIG_NAME, json.dumps(to_dict(self.config), indent=2) + "\n")
        self.save_extra_formats(d)
        return d

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location: str = "cpu") -> "VAE":
        """Load a model written by :meth:`save_pretrained` (by vaegan 0.1 too), built through the registry.

        Returns:
            The model in eval mode, on ``map_location``; :meth:`sample` then draws from the folder's default
            sampler.

        Raises:
            CheckpointError: missing/corrupt files or weights that do not fit the config.
            PluginError: the generator plugin the model was saved with is not installed.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .config import from_dict

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise CheckpointError(
                    f"'{p}' is missing: '{d}' is not a saved vaegan model. Pass the folder written by "
                    "save_pretrained (a training run's <output-dir>/final)."
                )
        try:
            with warnings.catch_warnings():  # a 0.1 file is read as it was written: nothing for its reader to fix
                warnings.simplefilter("ignore", DeprecationWarning)
                config = from_dict(ModelConfig, json.loads(cfg_path.read_text()), "model")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{cfg_path}' is not valid JSON ({exc}); the save is corrupt.") from None
        except ConfigError as exc:
            raise CheckpointError(f"'{cfg_path}' is not a vaegan model config: {exc}") from None
        # Shapes first, from the safetensors header and a generator built on the meta device: a config that does
        # not fit its weights (an image_size of 100000 would allocate gigabytes) is refused before any allocation.
        try:
            header = safetensors_shapes(w_path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"'{w_path}' cannot be read as safetensors ({exc}); the file is corrupt or "
                                  "truncated. Re-export it from a training checkpoint.") from None
        try:
            meta = _meta_state(config)
        except ConfigError as exc:
            raise CheckpointError(f"'{cfg_path}' describes a generator that cannot be built: {exc}") from None
        fits = _fits(header, meta, w_path, cfg_path)
        try:
            state = load_file(str(w_path), device=map_location)
            model = build_generator(config)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"'{w_path}' cannot be read as safetensors ({exc}); the file is corrupt or truncated. "
                "Re-export it from a training checkpoint."
            ) from None
        except ConfigError as exc:
            raise CheckpointError(f"'{cfg_path}' describes a generator that cannot be built: {exc}") from None
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise ResourceError(f"Loading '{d}' ran out of memory ({type(exc).__name__}); its weights need "
                                f"{mb(w_path.stat().st_size)}. Free memory, or load it on another device "
                                "(map_location).") from None
        if not isinstance(model, cls):
            raise CheckpointError(f"'{d}' holds a '{config.name}' generator ({type(model).__qualname__}), "
                                  f"not a {cls.__qualname__}; load it with vaegan.VAE.from_pretrained.")
        if not fits:  # the plugin could not be built on the meta device: the same check on the real one
            _fits({k: tuple(v.shape) for k, v in state.items()}, model.state_dict(), w_path, cfg_path)
        _check_finite(state, w_path)
        model.load_state_dict(state)
        # Where it came from: sample() draws from the folder's default sampler. Not a module attribute (no state).
        object.__setattr__(model, "_pretrained_dir", d)
        # In eval mode, as diffusers and transformers return their models: dropout or a batch statistic of a
        # plugin must not change a loaded model's outputs; training calls .train() itself.
        return model.to(map_location).eval()


def _meta_state(config: ModelConfig) -> Optional[Dict[str, Tensor]]:
    """The state dict of ``config``'s generator built on the meta device (no memory), or None where the plugin
    cannot be built there (a plugin that computes with real tensors in ``__init__``)."""
    try:
        with torch.device("meta"):
            return build_generator(config).state_dict()
    except (ConfigError, PluginError):
        raise
    except Exception:  # noqa: BLE001 - any other failure on meta: check after the real build instead
        return None


def _fits(header: Mapping[str, Tuple[int, ...]], expected: Optional[Mapping[str, Tensor]], w_path: Path,
          cfg_path: Path) -> bool:
    """Whether the weights' keys and shapes are the architecture's (False: not checked, ``expected`` is None).

    Raises:
        CheckpointError: they are not.
    """
    if expected is None:
        return False
    missing, unexpected, wrong = shape_differences(header, {k: v.shape for k, v in expected.items()})
    if missing or unexpected or wrong:
        shapes = "; ".join(f"{k}: file {list(header[k])}, config {list(expected[k].shape)}" for k in wrong[:3])
        raise CheckpointError(
            f"'{w_path}' does not fit the architecture in '{cfg_path}': missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}{' (' + shapes + ')' if shapes else ''}. The two "
            "files come from different models (or the config was edited); re-save them together.")
    return True


def build_generator(config: ModelConfig) -> VAE:
    """The generator plugin ``config.name``, built with ``config.options`` for ``config``'s images.

    Raises:
        PluginError: unknown or broken plugin, or one that is not a :class:`VAE`.
        ConfigError: an option it does not accept, or a value it rejects.

    Example:
        >>> build_generator(ModelConfig(name="mlp", options={"hidden": [64]})).latent_shape
        (16,)
    """
    from . import registry

    model = registry.build_plugin(GROUP, config.name, dict(config.options), image_shape=config.image_shape,
                                  output_range=config.output_range)
    if not model.config.name:  # a class registered under its own name keeps it (a factory plugin may build one)
        model.config = dataclasses.replace(model.config, name=config.name)
    return model


# 0.5: the finite check of loaded tensors serves every saved file (samplers too), so it lives with the files.
__getattr__ = deprecated_names(__name__, {"check_finite": "vaegan.files:check_finite"})
