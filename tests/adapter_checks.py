"""Checks every diffusers adapter test shares."""
import torch

# arguments a pipeline could pass that fastdiff cannot run: not tensors, a non-tensor timestep,
# mismatched shapes, an integer model output
BAD_CALLS = [(None, 0, None), ("x", object(), 3), (torch.zeros(2), 0, torch.zeros(3)),
             (torch.zeros(2, dtype=torch.int64), 0, torch.zeros(2))]


def supports_never_raises(scheduler_class):
    """``fastdiff_supports`` answers False (never raises) before ``set_timesteps`` and on every bad
    call after it; returns the scheduler, its timesteps set (5 steps)."""
    sch = scheduler_class()
    assert not sch.fastdiff_supports(torch.zeros(2), 0, torch.zeros(2))  # before set_timesteps
    sch.set_timesteps(5)
    for bad in BAD_CALLS:
        assert sch.fastdiff_supports(*bad) is False
    return sch
