"""The program verifiers/sandbox.py runs once in each candidate tier to see what that tier really
isolates: identity, parent pid (1 in a PID namespace), network, interfaces, whether the working
directory and a path outside it are writable (``ANTISD_PROBE_PATH``), and the environment's names.
Prints one JSON line. Shipped as text and run as the sandbox's main program, never imported.
"""

import json
import os
import socket
import sys


def main():
    r = {"uid": os.getuid(), "euid": os.geteuid(), "pid": os.getpid(), "ppid": os.getppid()}
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        s.connect(("127.0.0.1", 9))
        r["net"] = "connected"
    except OSError as e:
        r["net"] = e.errno
    try:
        r["ifaces"] = [n for _, n in socket.if_nameindex()]
    except OSError:
        r["ifaces"] = None
    try:
        with open(sys.argv[0] + ".probe_inside", "x"):
            pass
        r["workdir_write"] = 0
    except OSError as e:
        r["workdir_write"] = e.errno
    try:
        with open(os.environ["ANTISD_PROBE_PATH"], "x"):
            pass
        r["outside_write"] = 0
    except OSError as e:
        r["outside_write"] = e.errno
    r["env"] = sorted(os.environ)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
