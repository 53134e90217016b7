"""What onnxruntime 1.32 does with other OrtCustomOp.version values (builds with -DSP_OP_VERSION=N)."""
import numpy as np
from common import HERE, random_adapter, reference, session, single_op_model

rng = np.random.default_rng(1)
ad = random_adapter(rng, 64, 32, 4, 0.1)
x = rng.standard_normal((2, 64)).astype(np.float32)
for v in (13, 33):
    lib = f"{HERE}/libsp_ortops_v{v}.so"
    print(f"--- OrtCustomOp.version = {v}")
    try:
        s = session(single_op_model(), lib=lib)
        (y,) = s.run(None, dict(x=x, **ad))
        print("  valid inputs: max_abs_err =", float(np.max(np.abs(y - reference(x, ad)))))
        bad = dict(ad, col_idx=np.full_like(ad["col_idx"], 999))
        try:
            (y,) = s.run(None, dict(x=x, **bad))
            print("  invalid col_idx: NO exception (legacy void KernelCompute cannot report errors); output shape",
                  y.shape if y is not None else None)
        except Exception as e:
            print("  invalid col_idx: exception:", str(e)[-120:])
    except Exception as e:
        print("  session creation/run failed:", type(e).__name__, str(e)[-200:])
