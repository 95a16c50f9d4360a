# Prints where, relative to the install prefix argv[1], python3 finds modules
# (for the wshost module's install rule). Debian's python3 reads
# <prefix>/lib/python3.X/dist-packages for /usr and /usr/local; elsewhere the
# interpreter's own scheme applies.
import os
import sys
import sysconfig

prefix = sys.argv[1]
version = "%d.%d" % sys.version_info[:2]
candidates = ["lib/python%s/dist-packages" % version, "lib/python3/dist-packages"]
for rel in candidates:
    if os.path.join(prefix, rel) in sys.path:
        print(rel)
        sys.exit(0)
if any(p.endswith("dist-packages") for p in sys.path):
    print(candidates[0])
    sys.exit(0)
scheme = "posix_prefix" if "posix_prefix" in sysconfig.get_scheme_names() else None
path = sysconfig.get_path("platlib", scheme, vars={"base": prefix, "platbase": prefix})
print(os.path.relpath(path, prefix))
