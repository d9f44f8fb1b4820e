"""Makes a checkout's .venv: a small virtual environment of its own over the shared one.

The environment with torch and the rest (gigabytes) is cached once per set of
requirement files and shared by every checkout (see the Makefile). A checkout's own
.venv holds only:

  site-packages/pagedkv_env.pth       adds the shared environment's site-packages (with
                                      site.addsitedir, so the .pth files there run too);
  site-packages/pagedkv_checkout.pth  the checkout's root: `import torch_pagedkv` and the
                                      `pagedkv_cli` module resolve to this checkout from
                                      any directory, as with an editable install;
  bin/pagedkv                         the `pagedkv` command (pagedkv_cli.main).

Installing into the shared environment instead would point every checkout at one.
Standard library only: `make` runs it with the shared environment's python.

    python scripts/checkout_venv.py VENV_DIR SHARED_ENV_DIR CHECKOUT_ROOT
"""
from __future__ import annotations

import os
import stat
import sys
import sysconfig
import venv


def site_packages(prefix: str) -> str:
    return sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix})


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    target, shared, root = (os.path.abspath(a) for a in argv)
    shared_site = site_packages(shared)
    if not os.path.isdir(shared_site):
        print(f"checkout_venv: {shared_site} does not exist: create the shared environment "
              "first (make env)", file=sys.stderr)
        return 1
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(target)
    site = site_packages(target)
    with open(os.path.join(site, "pagedkv_env.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({shared_site!r})\n")
    with open(os.path.join(site, "pagedkv_checkout.pth"), "w") as f:
        f.write(root + "\n")
    script = os.path.join(target, "bin", "pagedkv")
    with open(script, "w") as f:
        f.write(f"#!{os.path.join(target, 'bin', 'python')}\n"
                "import sys\n\nfrom pagedkv_cli import main\n\nsys.exit(main())\n")
    os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
