"""The pytest plugin (``pkfuse.harness.pytest_plugin``, entry point ``pytest11: pkfuse``): restart tests
written as a user writes them, against the ``pkfuse_host`` fixture."""

from __future__ import annotations

import pytest

from pkfuse.harness.pytest_plugin import Host

pytestmark = pytest.mark.mount


def test_a_restart_keeps_the_guest_and_its_dma(pkfuse_host: Host) -> None:
    cycle = pkfuse_host.restart()
    pkfuse_host.assert_ok(cycle)
    assert cycle.outcome == "live update" and cycle.blackout()["total"] > 0
    second = pkfuse_host.restart()
    pkfuse_host.assert_ok(second)
    assert second.before is not None and second.before.vcpus[0].counter > cycle.before.vcpus[0].counter


@pytest.mark.pkfuse_host(flow="ephemeral")
def test_a_kill_in_prepare_of_the_reviews_design_blocks_the_device(pkfuse_host: Host) -> None:
    cycle = pkfuse_host.restart(kill_at="prepare")
    pkfuse_host.assert_ok(cycle)
    assert cycle.outcome == "unplanned crash" and cycle.dma == {}  # judged from the device's log at teardown


def test_a_failed_check_fails_in_one_line_naming_the_cycle_and_the_check(pkfuse_host: Host) -> None:
    from pkfuse.harness.cycle import Hooks
    from pkfuse.vmm import abi

    reserved = abi.CONFIG_GPA + abi.CONFIG.fields["reserved"][1]
    cycle = pkfuse_host.restart(hooks=Hooks(before_jump=lambda cast, c: cast.flip_byte(reserved)))
    with pytest.raises(pytest.fail.Exception, match=r"^cycle 1 \(persistent, live update\): guest memory clean "
                                                    r"after finish"):
        pkfuse_host.assert_ok(cycle)
    pkfuse_host.cast.flip_byte(reserved)  # mended: the end's verdict is clean again
