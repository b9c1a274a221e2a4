"""Fill the data folder: link a local copy of the data when one is given and present,
else download the official CS224N minBERT starter files (needs internet).

    python data/download.py [--data_dir data] [--link_from ../shared/data] [--force]

Standard library only, so it runs before the virtual environment exists.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.request

# The starter's own data folder (github.com/gpoesia/minbert-default-final-project).
BASE_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data"
OFFICIAL_FILES = [
    "ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv",
    "ids-cfimdb-train.csv", "ids-cfimdb-dev.csv", "ids-cfimdb-test-student.csv",
    "quora-train.csv", "quora-dev.csv", "quora-test-student.csv",
    "sts-train.csv", "sts-dev.csv", "sts-test-student.csv",
]
# Not part of the starter: 500 reviews per star sampled from the public Yelp sample.
LOCAL_ONLY_FILES = ["yelp-aux-train.csv"]


def download(url: str, dest: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


def link_local(source: str, data_dir: str, force: bool) -> int:
    linked = 0
    for name in sorted(os.listdir(source)):
        dest = os.path.join(data_dir, name)
        if not name.endswith(".csv") or (os.path.lexists(dest) and not force):
            continue
        if os.path.lexists(dest):
            os.remove(dest)
        os.symlink(os.path.abspath(os.path.join(source, name)), dest)
        linked += 1
    return linked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("MINBERT_DATA_DIR", "data"))
    parser.add_argument("--link_from", default="", help="a local data folder to link from")
    parser.add_argument("--force", action="store_true", help="replace files already there")
    args = parser.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    if args.link_from and os.path.isdir(args.link_from):
        count = link_local(args.link_from, args.data_dir, args.force)
        print(f"data: {args.data_dir} links {count} new file(s) from {args.link_from}")
        return 0
    missing = [n for n in OFFICIAL_FILES
               if args.force or not os.path.exists(os.path.join(args.data_dir, n))]
    for name in missing:
        print(f"downloading {BASE_URL}/{name}")
        try:
            download(f"{BASE_URL}/{name}", os.path.join(args.data_dir, name))
        except OSError as err:
            print(f"error: could not download {name}: {err}", file=sys.stderr)
            return 1
    print(f"data: {args.data_dir} has the starter files "
          f"({', '.join(LOCAL_ONLY_FILES)} is only available from a local copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
