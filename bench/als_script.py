"""The 20-line script a shop would write instead of ``recsvc train``: what bench/train.py compares with.

    python bench/als_script.py EVENTS.csv OUT_DIR [THREADS]

pyarrow CSV read -> dictionary-encode the ids -> CSR with weights view 1 / cart 4 / purchase 10
(summed; other event types 0) -> implicit ALS (64 factors, 15 iterations, BLAS on one thread as
implicit asks) -> ``np.save`` the factors. Prints one JSON line: its stages' wall and CPU seconds
and the peak RSS (Linux VmHWM) after each (no validation, no evaluation, no id maps on disk: the
floor of the job).
"""

import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

stages: dict[str, list[float]] = {}
last = [time.perf_counter(), time.process_time()]


def done(stage: str) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    with open("/proc/self/status") as f:  # VmHWM, not ru_maxrss: that counts the parent's RSS at fork
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    stages[stage] = [round(wall - last[0], 3), round(cpu - last[1], 3), round(peak, 1)]
    last[:] = [wall, cpu]


done("start")  # interpreter start-up and imports are measured by the parent
path, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0
table = csv.read_csv(
    path, convert_options=csv.ConvertOptions(include_columns=["user_id", "item_id", "event"])
)
users = pc.dictionary_encode(table["user_id"]).combine_chunks()
items = pc.dictionary_encode(table["item_id"]).combine_chunks()
weight = np.array([1.0, 4.0, 10.0, 0.0], np.float32)[  # any other event type: weight 0
    pc.index_in(table["event"], pa.array(["view", "cart", "purchase"])).fill_null(3).to_numpy()
]
done("load")
matrix = sp.csr_matrix(
    (weight, (users.indices.to_numpy(), items.indices.to_numpy())),
    shape=(len(users.dictionary), len(items.dictionary)),
)
done("matrix")
with threadpool_limits(limits=1, user_api="blas"):
    model = AlternatingLeastSquares(factors=64, iterations=15, num_threads=threads, random_state=42)
    model.fit(matrix, show_progress=False)
done("fit")
np.save(f"{out}/user_factors.npy", model.user_factors)
np.save(f"{out}/item_factors.npy", model.item_factors)
done("write")
print(json.dumps({"stages": stages, "nnz": int(matrix.nnz), "shape": list(matrix.shape)}))
