"""The live iommufd objects in the views (``views.render_iommufd``, the status's ``iommufd`` line), rendered
from ``backing.iommufd`` objects made in-process, with no mount. The same text through a real mount and a
real client: tests/mount/test_control_admin.py."""

from __future__ import annotations

from pathlib import Path

from backing import format as fmt
from backing.iommu import Iommu
from backing.iommufd import Iommufd
from backing.store import Store
from pkfuse.daemon import views

MiB = 1 << 20


def test_each_context_lists_its_ioas_areas_hwpts_and_devices_then_the_dying_domains(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        g = s.create(s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o600, 0, 0)
        s.truncate(g, 8 * MiB)
        fd = Iommufd(s, io)
        try:
            kernel = io.create_domain()  # a kernel-owned domain: DID 1, not iommufd's
            a, b = fd.open_context(), fd.open_context()
            ioas = a.ioas_alloc()
            a.ioas_map_file(ioas, g, 0, 2 * MiB, 0x100000, writeable=True)
            a.ioas_map_file(ioas, g, 4 * MiB, 2 * MiB, 0x40000000, writeable=False)
            dev = a.device_bind(fmt.requester_id(0, 4, 0))
            auto = a.device_attach(dev, ioas)
            other = a.device_bind(fmt.requester_id(1, 0, 2))
            hwpt = a.hwpt_alloc(other, ioas)
            dids = {h: a.hwpt(h).domain.domain_id for h in (auto, hwpt)}
            text = views.render_iommufd(fd, {a: 4242})
            assert text.splitlines() == [
                "iommufd: 2 contexts, 1 ioas, 2 hwpts, 2 devices",
                "context of pid 4242: 5 objects",
                f"  ioas {ioas}: 2 areas, hwpts {auto}, {hwpt}",
                "    0x000000100000-0x0000002fffff -> guest_mem/vm0+0x0 rw",
                "    0x000040000000-0x0000401fffff -> guest_mem/vm0+0x400000 r-",
                f"  hwpt {auto}: ioas {ioas}, DID {dids[auto]}, auto, devices {dev}",
                f"  hwpt {hwpt}: ioas {ioas}, DID {dids[hwpt]}, allocated, devices none",
                f"  device {dev}: rid 00:04.0, attached hwpt {auto}",
                f"  device {other}: rid 01:00.2, attached none",
                "context of unknown pid: 0 objects",
            ]
            assert kernel.domain_id not in dids.values()
            status = views.render_status(s, iommu=io, iommufd=fd)
            assert "\niommufd:" in status and status.splitlines()[-1].split(None, 1) == [
                "iommufd:", "2 contexts, 1 ioas, 2 hwpts, 2 devices"]
            assert "iommufd" not in views.render_status(s, iommu=io)  # pkfuse info IMAGE: no such line
            a.close()  # the auto HWPT's domain was attached: it waits out its grace period
            b.close()
            lines = views.render_iommufd(fd).splitlines()
            assert lines[0] == "iommufd: 0 contexts, 0 ioas, 0 hwpts, 0 devices"
            assert lines[1:] == [f"freeing domains {dids[auto]} (destroyed HWPTs', in their grace period)"]
        finally:
            fd.close()
