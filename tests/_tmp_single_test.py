import glob, os, shutil, logging
import jax, numpy as np
from deit_jax.checkpoint import TrainCheckpointer
import test_checkpoint as t

def test_each(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    states = {s: t._state(mesh, seed=s) for s in (1, 2)}
    base = tmp_path / "base"
    with TrainCheckpointer(base, save_every_steps=1, keep=5, async_save=False) as c:
        for s, st in states.items(): c.save(s, st, data_state={"p": s})
    files = sorted(f for f in glob.glob(str(base / "2" / "**"), recursive=True) if os.path.isfile(f))
    for i, f in enumerate(files):
        for mode in ("truncate", "delete"):
            d = tmp_path / f"{i}{mode}"; shutil.copytree(base, d)
            g = str(d) + f[len(str(base)):]
            if mode == "truncate": os.truncate(g, os.path.getsize(g) // 2)
            else: os.remove(g)
            try:
                with TrainCheckpointer(d, save_every_steps=1, keep=5) as c:
                    r = c.restore(t._abstract(states[1]))
                res = r[0]
                try:
                    t._assert_same(r[1], states[r[0]]); res = f"{res} values OK"
                except AssertionError: res = f"{res} VALUES WRONG"
            except Exception as e:
                res = f"EXC {type(e).__name__}: {str(e)[:100]}"
            print(mode, f[len(str(base)):], os.path.getsize(f), "->", res)
