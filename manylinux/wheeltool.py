#!/usr/bin/env python3
"""Wheel post-processing and checks for manylinux/build-wheels.sh.

    wheeltool.py fix-names <wheel> --target <triple>
        Renames every extension module in the wheel to the file name the
        *target* interpreter looks for (``thread_aio.cpython-312-aarch64-linux-gnu.so``)
        and regenerates RECORD.  Needed for cross builds: setuptools-rust names
        the file after the *host* interpreter's EXT_SUFFIX (musl: ``...-x86_64-linux-gnu.so``,
        never imported by a musl CPython) or strips the suffix (aarch64: ``thread_aio.so``).
        musl targets: zig links musl as DT_NEEDED ``libc.so``; this is rewritten (patchelf)
        to ``libc.musl-<arch>.so.1``, the soname Alpine's toolchain records and auditwheel's
        musllinux policy knows (musl's loader maps every ``libc.*`` name to itself, so both
        load the same). The wheel is rewritten in place.

    wheeltool.py check <wheel> --target <triple> --modules a,b,c [--max-glibc 2.17]
        Static checks of every extension module: canonical file name, ELF machine,
        exported PyInit_<name>, no libpython in DT_NEEDED, glibc symbol versions
        <= --max-glibc (gnu) or only musl's libc (musl), no strong undefined
        C-library symbol without a version (gnu: such a symbol, e.g. statx linked
        against glibc 2.17 stubs, makes the module unloadable on old glibc), RECORD hashes.
        Prints one summary line.

Uses pyelftools (an auditwheel dependency; run it with the tools venv's python).
"""

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import sys
import tempfile
import zipfile

MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}


def parse_target(triple):
    """``aarch64-unknown-linux-gnu.2.17`` -> ("aarch64", "gnu")."""
    triple = re.sub(r"\.\d+\.\d+$", "", triple)
    parts = triple.split("-")
    if (
        len(parts) != 4
        or parts[2] != "linux"
        or parts[0] not in MACHINES
        or parts[3] not in ("gnu", "musl")
    ):
        raise SystemExit(f"wheeltool: unsupported target {triple!r}")
    return parts[0], parts[3]


def wheel_tags(name):
    """caio-0.12.11-cp313-cp313t-manylinux2014_x86_64.whl -> ("cp313", "cp313t", plat)."""
    stem = os.path.basename(name)[: -len(".whl")]
    parts = stem.split("-")
    return parts[-3], parts[-2], parts[-1]


def ext_suffix(abi_tag, arch, libc):
    m = re.fullmatch(r"cp(\d)(\d+)(t?)", abi_tag)
    if not m:
        raise SystemExit(f"wheeltool: cannot derive EXT_SUFFIX from ABI tag {abi_tag!r}")
    return f".cpython-{m.group(1)}{m.group(2)}{m.group(3)}-{arch}-linux-{libc}.so"


EXT_RE = re.compile(r"^caio/([A-Za-z_][A-Za-z0-9_]*)(\.[^/]*)?\.so$")


def record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def read_wheel(path):
    with zipfile.ZipFile(path) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def record_name(entries):
    names = [i.filename for i, _ in entries if i.filename.endswith(".dist-info/RECORD")]
    if len(names) != 1:
        raise SystemExit("wheeltool: expected exactly one RECORD")
    return names[0]


def write_wheel(path, entries):
    """Rewrites the wheel with a regenerated RECORD (written last)."""
    rec = record_name(entries)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for info, data in entries:
        if info.filename == rec or info.filename.endswith("/"):
            continue
        writer.writerow([info.filename, record_hash(data), len(data)])
    writer.writerow([rec, "", ""])
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for info, data in entries:
                if info.filename == rec:
                    continue
                zi = zipfile.ZipInfo(info.filename, info.date_time)
                zi.external_attr = info.external_attr
                zi.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(zi, data)
            zi = zipfile.ZipInfo(rec, entries[0][0].date_time)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, out.getvalue().encode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_fix_names(args):
    arch, libc = parse_target(args.target)
    _, abi, _ = wheel_tags(args.wheel)
    suffix = ext_suffix(abi, arch, libc)
    entries = read_wheel(args.wheel)
    renamed = []
    new_entries = []
    for info, data in entries:
        m = EXT_RE.match(info.filename)
        if m:
            new = f"caio/{m.group(1)}{suffix}"
            if new != info.filename:
                renamed.append(f"{info.filename} -> {new}")
                info = _renamed(info, new)
            if libc == "musl":
                fixed = _musl_soname(data, arch)
                if fixed != data:
                    renamed.append(f"{info.filename}: DT_NEEDED libc.so -> {MUSL_SONAME % arch}")
                    data = fixed
        new_entries.append((info, data))
    names = [i.filename for i, _ in new_entries]
    if len(names) != len(set(names)):
        raise SystemExit(f"wheeltool: duplicate names after renaming in {args.wheel}")
    if renamed:
        write_wheel(args.wheel, new_entries)
    for line in renamed:
        print(f"  renamed {line}")
    if not renamed:
        print("  module names already canonical")


MUSL_SONAME = "libc.musl-%s.so.1"


def _musl_soname(data, arch):
    """DT_NEEDED libc.so -> libc.musl-<arch>.so.1 (patchelf from PATH)."""
    import subprocess

    if "libc.so" not in elf_facts(data)[1]:
        return data
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.so")
        with open(path, "wb") as f:
            f.write(data)
        subprocess.run(
            ["patchelf", "--replace-needed", "libc.so", MUSL_SONAME % arch, path], check=True
        )
        with open(path, "rb") as f:
            return f.read()


def _renamed(info, new):
    zi = zipfile.ZipInfo(new, info.date_time)
    zi.external_attr = info.external_attr
    zi.compress_type = info.compress_type
    return zi


def elf_facts(data):
    from elftools.elf.elffile import ELFFile
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection

    elf = ELFFile(io.BytesIO(data))
    needed, exports, versions, interp = [], set(), set(), None
    dynsym = versym = None
    for sec in elf.iter_sections():
        if isinstance(sec, DynamicSection):
            needed += [t.needed for t in sec.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        elif isinstance(sec, GNUVerNeedSection):
            for _, auxiliaries in sec.iter_versions():
                versions.update(a.name for a in auxiliaries)
        elif isinstance(sec, GNUVerSymSection):
            versym = sec
        elif sec.name == ".dynsym":
            dynsym = sec
            for sym in sec.iter_symbols():
                if sym["st_shndx"] != "SHN_UNDEF" and sym["st_info"]["bind"] == "STB_GLOBAL":
                    exports.add(sym.name)
    # strong undefined symbols with no symbol version, except the Python C API (resolved
    # from the interpreter, never versioned)
    unversioned = []
    if dynsym is not None:
        for i, sym in enumerate(dynsym.iter_symbols()):
            if i == 0 or sym["st_shndx"] != "SHN_UNDEF" or sym["st_info"]["bind"] != "STB_GLOBAL":
                continue
            if sym.name.startswith(("Py", "_Py")):
                continue
            ndx = versym.get_symbol(i)["ndx"] if versym is not None else "VER_NDX_GLOBAL"
            if ndx in ("VER_NDX_LOCAL", "VER_NDX_GLOBAL", 0, 1):
                unversioned.append(sym.name)
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            interp = seg.get_interp_name()
    return elf["e_machine"], needed, exports, versions, interp, sorted(unversioned)


def vkey(v):
    return tuple(int(x) for x in v.split("."))


def cmd_check(args):
    arch, libc = parse_target(args.target)
    py, abi, plat = wheel_tags(args.wheel)
    suffix = ext_suffix(abi, arch, libc)
    modules = [m for m in args.modules.split(",") if m]
    problems = []
    if not plat.endswith("_" + arch):
        problems.append(f"platform tag {plat} is not for {arch}")
    want_plat = "musllinux_" if libc == "musl" else "manylinux"
    if not plat.startswith(want_plat):
        problems.append(f"platform tag {plat} is not {want_plat}*")
    entries = read_wheel(args.wheel)
    files = {i.filename: d for i, d in entries}
    # RECORD must match the content
    rec = record_name(entries)
    listed = {}
    for row in csv.reader(io.StringIO(files[rec].decode())):
        if row:
            listed[row[0]] = row[1]
    for name, data in files.items():
        if name == rec or name.endswith("/"):
            continue
        if listed.get(name) != record_hash(data):
            problems.append(f"RECORD hash mismatch/missing for {name}")
    exts = sorted(n for n in files if EXT_RE.match(n))
    expected = sorted(f"caio/{m}{suffix}" for m in modules)
    if exts != expected:
        problems.append(f"extension modules {exts} != expected {expected}")
    max_glibc = "0"
    for name in exts:
        machine, needed, exports, versions, interp, unversioned = elf_facts(files[name])
        mod = EXT_RE.match(name).group(1)
        if machine != MACHINES[arch]:
            problems.append(f"{name}: e_machine {machine}, expected {MACHINES[arch]}")
        if f"PyInit_{mod}" not in exports:
            problems.append(f"{name}: PyInit_{mod} is not exported")
        if interp:
            problems.append(f"{name}: has a PT_INTERP ({interp})")
        if any("libpython" in n for n in needed):
            problems.append(f"{name}: links libpython ({needed})")
        glibc = [
            v[len("GLIBC_") :] for v in versions if v.startswith("GLIBC_") and v[6:7].isdigit()
        ]
        if libc == "musl":
            if glibc or needed != [MUSL_SONAME % arch]:
                problems.append(
                    f"{name}: not a musl-only module (NEEDED {needed}, GLIBC {sorted(glibc)}); "
                    f"expected NEEDED [{MUSL_SONAME % arch}]"
                )
        else:
            if unversioned:
                problems.append(
                    f"{name}: strong undefined symbols without a glibc version (not in the "
                    f"target glibc; the import fails there): {', '.join(unversioned)}"
                )
            allowed = {
                "libc.so.6",
                "libm.so.6",
                "libpthread.so.0",
                "libdl.so.2",
                "librt.so.1",
                "libgcc_s.so.1",
                "ld-linux-x86-64.so.2",
                "ld-linux-aarch64.so.1",
            }
            if set(needed) - allowed:
                problems.append(f"{name}: unexpected DT_NEEDED {sorted(set(needed) - allowed)}")
            if glibc:
                top = max(glibc, key=vkey)
                if vkey(top) > vkey(max_glibc):
                    max_glibc = top
                if args.max_glibc and vkey(top) > vkey(args.max_glibc):
                    problems.append(f"{name}: needs GLIBC_{top} > {args.max_glibc}")
    if problems:
        for p in problems:
            print(f"  FAIL {os.path.basename(args.wheel)}: {p}")
        return 1
    libc_info = f"musl {MUSL_SONAME % arch} only" if libc == "musl" else f"max GLIBC_{max_glibc}"
    print(
        f"  ok {os.path.basename(args.wheel)}: {len(exts)} modules {suffix}, {MACHINES[arch]}, "
        f"PyInit_* exported, {libc_info}, RECORD ok"
    )
    return 0


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fix-names")
    p.add_argument("wheel")
    p.add_argument("--target", required=True)
    p = sub.add_parser("check")
    p.add_argument("wheel")
    p.add_argument("--target", required=True)
    p.add_argument("--modules", required=True)
    p.add_argument("--max-glibc", default="")
    args = ap.parse_args()
    if args.cmd == "fix-names":
        cmd_fix_names(args)
        return 0
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
