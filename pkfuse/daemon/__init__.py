"""The kernel in a process: the daemon that owns the image and serves it.

One module per job:

- ``preflight``: the checks before a daemon starts, ``MountError`` and the exit statuses;
- ``options``: ``-o`` options, which are pkfuse's and which go to libfuse;
- ``logs``: where the daemon's log and stdio go;
- ``serve``: open the image and the IOMMU, mount, run the trio loop, shut down;
- ``daemonize``: fork the daemon and wait until its mount answers;
- ``mountinfo``: this namespace's mounts, read without touching them;
- ``unmount``: find the daemon by the image's flock, unmount, wait for it;
- ``fs``: the pyfuse3 ``Operations`` (the FUSE handlers);
- ``views``: the text of ``.pkernfs/*``, the xattrs and ``pkfuse info``.
"""
