"""
The paper's systems by their names: ADM (the diffusion models), ADM_classifier (the
noised-image classifiers), ADM_U (the super-resolution models) and ADM_G (a diffusion
model guided by a classifier), built from the presets in configs/ (ADM_diffusion_256_conditioned,
ADM_classifier_256, ADM_U_64_256, ...). Thin over script_util.create_pretrained, sampling.sample and, for
ADM_G's editing methods (inpaint, sdedit, ilvr, dps), edit_sampling.

    model, diffusion = ADM("ADM_diffusion_256_conditioned", "models/256x256_diffusion.pt")
    classifier = ADM_classifier("ADM_classifier_256", "models/256x256_classifier.pt")
    images = ADM_G(model, diffusion, classifier, classifier_scale=1.0).sample(
        labels=[207, 360], sampler="dpmpp_2m", steps=15, seed=0)
"""

from . import edit_sampling
from .presets import read_preset
from .sampling import sample
from .script_util import build_preset, create_pretrained


_EXAMPLES = {"diffusion": "ADM_diffusion_256_conditioned", "classifier": "ADM_classifier_256",
             "super_res": "ADM_U_64_256"}


def _build(kind, name, checkpoint, device, use_fp16, overrides):
    """
    create_pretrained for a preset that must be of the given kind.
    """
    found = read_preset(name).get("kind")
    if found != kind:
        raise ValueError(f"preset {name!r} is a {found} preset; expected a {kind} preset "
                         f"(e.g. {_EXAMPLES[kind]})")
    if checkpoint is not None:
        return create_pretrained(name, checkpoint, device=device, use_fp16=use_fp16, **overrides)
    built, network, _, fp16 = build_preset(name, use_fp16, **overrides)
    network.to(device)
    if fp16:
        network.convert_to_fp16()
    return built


def ADM(name, checkpoint=None, device="cpu", use_fp16=None, **overrides):
    """
    An ADM diffusion model and its diffusion, by preset name.

    :param name: a diffusion preset, e.g. "ADM_diffusion_256_conditioned".
    :param checkpoint: the released weights (loaded for inference), or None: random weights.
    :param device: where to put the model.
    :param use_fp16: float16 torso; None follows the preset.
    :param overrides: flags replacing the preset's (e.g. timestep_respacing="250").
    :return: (model, diffusion).
    """
    return _build("diffusion", name, checkpoint, device, use_fp16, overrides)


def ADM_classifier(name, checkpoint=None, device="cpu", use_fp16=None, **overrides):
    """
    A noised-image classifier, by preset name (e.g. "ADM_classifier_256"); arguments as ADM.

    :return: the classifier.
    """
    return _build("classifier", name, checkpoint, device, use_fp16, overrides)


def ADM_U(name, checkpoint=None, device="cpu", use_fp16=None, **overrides):
    """
    A super-resolution model and its diffusion, by preset name (e.g. "ADM_U_64_256");
    arguments as ADM.

    :return: (model, diffusion).
    """
    return _build("super_res", name, checkpoint, device, use_fp16, overrides)


class ADM_G:
    """
    ADM-G: a diffusion model guided by a noised-image classifier.

    :param model: the diffusion model (e.g. from ADM).
    :param diffusion: its diffusion.
    :param classifier: the classifier (e.g. from ADM_classifier).
    :param classifier_scale: the guidance scale.
    :param guidance_interval: (sigma_lo, sigma_hi): guide only at the noise levels sigma in
        (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024; guidance.GuidanceInterval), or None:
        at every step.
    """

    def __init__(self, model, diffusion, classifier, classifier_scale=1.0, guidance_interval=None):
        self.model, self.diffusion = model, diffusion
        self.classifier, self.classifier_scale = classifier, classifier_scale
        self.guidance_interval = guidance_interval

    def sample(self, labels, sampler="dpmpp_2m", steps=15, seed=0, **options):
        """
        Guided samples of the given classes in one call (sampling.sample).

        :param labels: one class per sample (an int with num_samples=N: N of that class).
        :param sampler: a fast sampler of solvers.py, or None for the diffusion's own DDPM
            (or with use_ddim=True, DDIM) loop.
        :param steps: the sampler's model evaluations per sample.
        :param seed: per-sample seeded noise (None: the global RNG).
        :param options: other sample() arguments (batch_size, num_samples, cfg_scale, guide and
            guide_scale for autoguidance on top of the classifier, ...).
        :return: uint8 images [N x H x W x 3].
        """
        if sampler is None:
            steps = None
        images, _ = sample(self.model, self.diffusion, classifier=self.classifier,
                           classifier_scale=self.classifier_scale, labels=labels, sampler=sampler,
                           steps=steps, seed=seed, guidance_interval=self.guidance_interval, **options)
        return images

    def _edit(self, function, labels, seed, *args, **options):
        """
        An edit_sampling function run with this model, its diffusion and its classifier guidance.
        """
        images, _ = function(self.model, self.diffusion, *args, classifier=self.classifier,
                             classifier_scale=self.classifier_scale, labels=labels, seed=seed,
                             guidance_interval=self.guidance_interval, **options)
        return images

    def inpaint(self, images, mask, labels, seed=0, **options):
        """
        Guided RePaint inpainting (edit_sampling.inpaint: images uint8 [N x H x W x 3], mask
        1 = keep, one label per image; options: jump_length, jump_n_sample, batch_size, ...).

        :return: uint8 images [N x H x W x 3].
        """
        return self._edit(edit_sampling.inpaint, labels, seed, images, mask, **options)

    def sdedit(self, images, strength, labels, seed=0, **options):
        """
        Guided SDEdit from guide images at a strength in (0, 1] (edit_sampling.sdedit).

        :return: uint8 images [N x H x W x 3].
        """
        return self._edit(edit_sampling.sdedit, labels, seed, images, strength, **options)

    def ilvr(self, images, factor, labels, seed=0, **options):
        """
        Guided ILVR on reference images with downsampling factor N (edit_sampling.ilvr).

        :return: uint8 images [N x H x W x 3].
        """
        return self._edit(edit_sampling.ilvr, labels, seed, images, factor, **options)

    def dps(self, images, operator, labels, scale=1.0, seed=0, **options):
        """
        Guided DPS from the measurements operator(images) (edit_sampling.dps).

        :return: uint8 images [N x H x W x 3].
        """
        return self._edit(edit_sampling.dps, labels, seed, images, operator, scale=scale, **options)
