"""--device / MergeOptions.device: each mistake refused with a MergeEngineError naming the device."""
import pytest
import torch

from merge_engine.devices import resolve_device
from merge_engine.errors import MergeEngineError


@pytest.mark.parametrize("name, message", [("tpu", "not a device"), ("cuda:x", "not a device"),
                                           ("meta", "merge_engine runs on cpu or cuda")])
def test_devices_that_are_not_cpu_or_cuda_are_refused(name, message):
    with pytest.raises(MergeEngineError, match=f"device '{name}': {message}"):
        resolve_device(name)


def test_a_cuda_index_past_the_machines_gpus_is_refused_before_the_merge(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MergeEngineError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(MergeEngineError, match="device 'cuda:5'"):
        resolve_device(torch.device("cuda", 5))


def test_a_cpu_index_is_refused_as_the_cpu_is_one_device():
    assert resolve_device("cpu:0") == torch.device("cpu")
    with pytest.raises(MergeEngineError, match=r"device 'cpu:1': the CPU is one device, 'cpu'"):
        resolve_device("cpu:1")
