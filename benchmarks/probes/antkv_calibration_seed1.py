# Default-size calibration (16384 tokens of lee) with k-means seed 1 instead of 0: a noise check for the A/B.
import functools, kvpass.calibration.antkv as A
from kvpass.calibration import calibrate
from kvpass.config import AnTKV
from kvpass.models import load_model
A.calibrate_antkv = functools.partial(A.calibrate_antkv, seed=1)
model, tok = load_model("smollm2-135m")
cal = calibrate(model, AnTKV(bits=1), tokenizer=tok)
print(cal.meta["text"], cal.meta["sections"])
cal.save("/tmp/cal-seed1/cal.safetensors")
