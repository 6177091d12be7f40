"""Drop-in adapters for the libraries people already sample with (optional dependencies).

- :mod:`fastdiff.adapters.diffusers`: ``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``
  subclasses of diffusers' schedulers whose ``step`` runs the fused steps (``pip install diffusers``);
  :mod:`~fastdiff.adapters.diffusers_solvers` (DPM-Solver multistep, FlowMatch Euler),
  :mod:`~fastdiff.adapters.diffusers_deis` (``DEISMultistepScheduler``),
  :mod:`~fastdiff.adapters.diffusers_consistency` (``LCMScheduler``, ``TCDScheduler``) and
  :mod:`~fastdiff.adapters.diffusers_k` (``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``,
  ``LMSDiscreteScheduler``) likewise.
- :mod:`fastdiff.adapters.k_diffusion`: ``sample_euler``, ``sample_heun``, ``sample_euler_ancestral``, the
  DPM-Solver / LMS / DEIS / iPNDM samplers and ComfyUI's ``sample_lcm``
  with k-diffusion's signatures (no dependency: k-diffusion is only needed to compare against).

Each submodule is imported explicitly, so importing :mod:`fastdiff` never imports diffusers.
"""
