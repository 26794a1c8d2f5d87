"""The calibrated machine `foldmoe plan --calibrate` builds (orchestrator/planning.py)."""
from engine.planner.cost import CostConstants
from engine.planner.devices import DEVICES
from orchestrator.planning import machine_for


def test_gpu_calibration_keeps_the_datasheet_network():
    calibrated = {"device": {"peak_flops": 700e12, "hbm_bytes_per_s": 3e12, "intra_node_bytes_per_s": 350e9},
                  "constants": {"gemm_efficiency": 1.0, "link_efficiency": 1.0, "collective_latency_s": 2e-5}}
    machine = machine_for("h100", 8, calibrated)
    assert machine.device.peak_flops == 700e12 and machine.link.intra_bytes_per_s == 350e9
    assert machine.link.inter_bytes_per_s == DEVICES["h100"].inter_node_bytes_per_s * CostConstants().link_efficiency
    cpu = machine_for("cpu", 2, {"device": {**calibrated["device"], "inter_node_bytes_per_s": 1e9},
                                 "constants": calibrated["constants"]})
    assert cpu.link.inter_bytes_per_s == 1e9
