# Writes an omcb board file (format of crates/store/src/memory.rs, mod file)
# with N random checked boxes, marked clean: the starting board of the
# persist-stall benchmark (docs/BENCHMARKS.md).
# Usage: python3 benches/persist-board.py 1000000 500000 DATA_DIR/board.omcb
import random, struct, sys, time
size, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(7)
idx = sorted(rng.sample(range(size), n))
bits = bytearray(size // 8)
for i in idx:
    bits[i >> 3] |= 0x80 >> (i & 7)
now = int(time.time() * 1000)
body = bytearray(b"OMCBRD01")
body += bytes([1])
body += struct.pack("<IQQII", size, 0x1234567890ABCDEF, n, n, 0)
body += bits
body += bytes(size // 8)
body += struct.pack("<I", n)
body += b"".join(struct.pack("<IQ", i, now) for i in idx)
h = 0xcbf29ce484222325
M = 0x100000001b3
mask = (1 << 64) - 1
for b in body:
    h = ((h ^ b) * M) & mask
body += struct.pack("<Q", h)
open(out, "wb").write(body)
print(len(body), "bytes")
