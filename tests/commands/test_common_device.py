import click
import pytest
import torch

from facepipe.commands.common import resolve_device


def test_cpu_is_accepted_in_any_case():
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"


@pytest.mark.parametrize("device", ["bogus", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda0", "cpu:0", ""])
def test_malformed_devices_are_one_usage_error(device):
    with pytest.raises(click.UsageError, match="is not a device: use cpu, cuda, cuda:N or mps"):
        resolve_device(device)


def test_unavailable_devices_are_one_usage_error():
    if not torch.cuda.is_available():
        with pytest.raises(click.UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(click.UsageError, match="CUDA|cuda:99"):
        resolve_device("cuda:99")
    if not torch.backends.mps.is_available():
        with pytest.raises(click.UsageError, match="MPS is not available"):
            resolve_device("mps")
