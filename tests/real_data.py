"""Fetches the real annotated images the accuracy tests use, from a package registry, into a
cache folder (idempotent; the files are checked by SHA-256, so a changed upload is an error, not
a silently different test).

    .venv/bin/python tests/real_data.py .cache/real-data

What it holds:

- `dsb2018_img2d.tif`, `dsb2018_mask2d.tif`: a 512x512 fluorescence nuclei image of the 2018
  Data Science Bowl (Caicedo et al., Nature Methods 16, 2019) and its 125 annotated nuclei, as
  StarDist ships them in its PyPI wheel (`stardist/data/images/`, BSD-3-Clause, licence copied
  beside them). Only the two images are extracted; StarDist itself is not installed.
"""

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

STARDIST = "stardist==0.9.2"
FILES = {
    "stardist/data/images/img2d.tif": ("dsb2018_img2d.tif",
                                       "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "stardist/data/images/mask2d.tif": ("dsb2018_mask2d.tif",
                                        "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def present(dest: Path) -> bool:
    return all((dest / name).exists() and sha256(dest / name) == digest for name, digest in FILES.values())


def fetch(dest: Path) -> None:
    if present(dest):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", STARDIST, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("stardist-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for member, (name, digest) in FILES.items():
                data = z.read(member)
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise SystemExit(f"{wheel.name}:{member} has SHA-256 {got}, expected {digest}")
                (dest / name).write_bytes(data)
            licence = next(n for n in z.namelist() if n.endswith("licenses/LICENSE.txt"))
            with z.open(licence) as src, open(dest / "STARDIST_LICENSE.txt", "wb") as out:
                shutil.copyfileobj(src, out)


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / ".cache" / "real-data")
