"""Print the version of a package that setup.cfg caps (`torch<=2.14.1` -> 2.14.1): the image
installs exactly what the project is tested with, and setup.cfg is the one place that says it.

    python3 docker/pins.py torch
"""

import configparser
import re
import sys


def pin(name: str, path: str = "setup.cfg") -> str:
    cfg = configparser.ConfigParser()
    cfg.read(path)
    for line in cfg["options"]["install_requires"].splitlines():
        m = re.fullmatch(rf"\s*{re.escape(name)}\s*([^;]*)", line)
        if m:
            cap = re.search(r"<=\s*([\w.]+)", m.group(1))
            if cap:
                return cap.group(1)
    raise SystemExit(f"{path}: no '{name}<=X' in install_requires")


if __name__ == "__main__":
    print(pin(sys.argv[1], *sys.argv[2:]))
