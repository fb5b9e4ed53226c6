"""Per-sensor calibration against a trusted reference meter: the maths, and writing the result to the config.

A PZEM-017 is specified at 1 %. A user with a better multimeter can correct each sensor with
``value = raw × gain + offset`` for voltage and for current (``[sensors.calibration]`` in the config; the
poller applies it and marks the point ``calibrated``). This module holds:

- pure functions (no I/O) that fit a gain (one reference point) or a gain and an offset (two or more
  points: a straight line through them, least squares beyond two), judge an error against the 1 % spec,
  and apply a calibration to decoded values;
- ``save_calibration``, which writes the result into the TOML file that defines the sensor with tomlkit,
  so that the user's comments and layout survive.

The meter's own factory calibration (function 0x41 at the general address) is never used: it needs a
precise reference source connected to the meter and, done wrong, leaves the meter mis-calibrated for good.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

import tomlkit
from tomlkit.exceptions import TOMLKitError

from .config import Calibration, local_path_for
from .errors import CalibrationError, ConfigError
from .models import Model, decimals, shunt_amps

SPEC_PERCENT = 1.0  # PZEM-003/017 (and the AC models): specified accuracy of 1 %

# Gains are accepted between these (the config model refuses others): a larger correction means a wiring or
# shunt-code problem, not a calibration.
GAIN_MIN, GAIN_MAX = 0.5, 1.5
# actual shunt / shunt code, for every pair of ratings a model has a code for (PZEM-017: 50, 100, 200, 300 A)
SHUNT_RATIOS = sorted({a / c for a in shunt_amps() for c in shunt_amps() if a != c})


@dataclass(frozen=True, slots=True)
class Fit:
    """value = raw × gain + offset."""

    gain: float = 1.0
    offset: float = 0.0

    def apply(self, raw: float) -> float:
        return raw * self.gain + self.offset


@dataclass(frozen=True, slots=True)
class PointError:
    """How far a measured value is from the reference: absolute, in percent of the reference (None when
    the reference is 0), and whether that is within the spec (1 % of the reading plus one count of the
    meter's resolution, since a reading cannot be closer than its last digit)."""

    measured: float
    reference: float
    abs_error: float
    pct_error: float | None
    within_spec: bool


def fit(pairs: Sequence[tuple[float, float]], *, quantity: str = "value", resolution: float = 0.01) -> Fit:
    """Fit ``reference ≈ raw × gain + offset`` to (raw, reference) pairs.

    One pair gives a gain only (offset 0): right for a meter whose error is proportional, which is what a
    wrong internal reference or shunt tolerance gives. Two or more pairs also give an offset (exact line
    through two, least squares through more); the pairs' raw values must then be well apart, or the slope
    is just noise."""
    if not pairs:
        raise CalibrationError(f"{quantity}: no reference points")
    raws = [float(r) for r, _ in pairs]
    refs = [float(y) for _, y in pairs]
    if len(pairs) == 1:
        raw, ref = raws[0], refs[0]
        if abs(raw) < 2 * resolution or abs(ref) < 2 * resolution:
            raise CalibrationError(f"{quantity}: one point at zero cannot give a gain; measure at a real "
                                   f"load (meter {raw:g}, reference {ref:g})")
        return Fit(gain=ref / raw, offset=0.0)
    spread = max(raws) - min(raws)
    if spread < max(10 * resolution, 0.1 * max(abs(r) for r in raws)):
        raise CalibrationError(f"{quantity}: the points are too close together (meter read {min(raws):g} to "
                               f"{max(raws):g}); use points far apart, e.g. near 20 % and 80 % of the range, "
                               f"or give one point for a gain only")
    slope, intercept = statistics.linear_regression(raws, refs)
    return Fit(gain=slope, offset=intercept)


def point_error(measured: float, reference: float, *, resolution: float = 0.01,
                spec_percent: float = SPEC_PERCENT) -> PointError:
    err = measured - reference
    pct = None if reference == 0 else 100.0 * err / abs(reference)
    within = abs(err) <= spec_percent / 100.0 * abs(reference) + resolution * 1.0001
    return PointError(measured, reference, err, pct, within)


def check_gain(quantity: str, f: Fit) -> None:
    """Refuse corrections that are not calibrations, with the likely cause. For current, a gain near the
    ratio of two shunt ratings (e.g. 2/3: a 200 A shunt on the 300 A code) is a wrong shunt code even where
    it is inside the accepted range."""
    if quantity == "current":
        for ratio in SHUNT_RATIOS:
            if abs(f.gain / ratio - 1) < 0.05:
                raise CalibrationError(
                    f"current gain {f.gain:.4f} is the ratio of two shunt ratings ({ratio:.3g}): the meter's "
                    f"shunt code does not match its shunt, that is not a calibration error; check it with "
                    f"`dcmon shunt get` and fix it with `dcmon shunt set --amps A`")
    if not GAIN_MIN < f.gain < GAIN_MAX:
        raise CalibrationError(f"{quantity} gain {f.gain:.4f} is outside {GAIN_MIN}..{GAIN_MAX}: that is not a "
                               f"calibration error; check the reference meter's range and the wiring")


def calibration_from(existing: Calibration, voltage: Fit | None, current: Fit | None) -> Calibration:
    """The new calibration: fitted quantities replace the old values (raw readings were fitted, so fits do
    not compose with the old ones); a quantity without reference points keeps what it had."""
    data = asdict(existing)
    if voltage is not None:
        check_gain("voltage", voltage)
        data.update(voltage_gain=round(voltage.gain, 6), voltage_offset=round(voltage.offset, 4))
    if current is not None:
        check_gain("current", current)
        data.update(current_gain=round(current.gain, 6), current_offset=round(current.offset, 4))
    return Calibration(**data)


def fit_of(cal: Calibration, quantity: str) -> Fit:
    return Fit(getattr(cal, f"{quantity}_gain"), getattr(cal, f"{quantity}_offset"))


def apply_calibration(values: Mapping[str, Any], cal: Calibration, model: Model | None = None) -> dict[str, Any]:
    """Decoded values with the calibration applied: voltage and current corrected (never below 0: the
    meters measure magnitudes), power scaled by the same correction (P = V × I × power factor, so the
    factor is V_cal·I_cal / V·I). The energy counter is the meter's own integral and stays as it is.

    Corrected values are rounded to the meter's resolution (``model``'s registers: 0.01 V, 0.01 A, 0.1 W for a
    PZEM-017): a correction makes a value more accurate, not finer, and 163.83947936847986 W stored in
    InfluxDB would claim digits no meter gave. Without a model: 4, 5 and 3 decimals.
    Returns a new dict; the input is not changed."""
    out = dict(values)
    if cal.is_identity:
        return out
    places = {"voltage_v": 4, "current_a": 5, "power_w": 3}
    if model is not None:
        places.update({r.name: decimals(r.scale) for r in model.inputs if r.name in places})
    v, i = values.get("voltage_v"), values.get("current_a")
    if _number(v):
        out["voltage_v"] = round(max(0.0, fit_of(cal, "voltage").apply(v)), places["voltage_v"])
    if _number(i):
        out["current_a"] = round(max(0.0, fit_of(cal, "current").apply(i)), places["current_a"])
    p = values.get("power_w")
    if _number(p) and v and i:
        out["power_w"] = round(p * (out["voltage_v"] * out["current_a"]) / (v * i), places["power_w"])
    return out


def _number(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------- config file

def defining_file(config_path: str | os.PathLike[str]) -> Path:
    """The file whose ``[[sensors]]`` list is in effect: the loader replaces lists rather than merging
    them, so if config.local.toml has a ``sensors`` list, that is the one in use (and the one to edit);
    otherwise the main file."""
    main = Path(config_path)
    local = local_path_for(main)
    if local.exists():
        try:
            if "sensors" in tomlkit.parse(local.read_text(encoding="utf-8")):
                return local
        except (OSError, TOMLKitError):
            pass  # the loader has already said what is wrong with it, if anything
    return main


def save_calibration(path: str | os.PathLike[str], sensor: str, cal: Calibration) -> None:
    """Write ``cal`` into the ``[sensors.calibration]`` table of the sensor named ``sensor`` in ``path``,
    keeping every other byte of the file (comments, order, spacing) as it was. Atomic: a crash leaves
    either the old or the new file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        doc = tomlkit.parse(text)
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read: {e.strerror}", "check the path and permissions") from None
    except TOMLKitError as e:
        raise ConfigError(str(p), "", f"not valid TOML: {e}", "fix the syntax at that line") from None
    table = next((t for t in doc.get("sensors", []) if isinstance(t, MutableMapping) and t.get("name") == sensor), None)
    if table is None:
        raise ConfigError(str(p), "sensors", f"no sensor named {sensor!r} in this file",
                          "add it there first (dcmon calibrate edits the file that defines the sensor)")
    values = {k: float(v) for k, v in asdict(cal).items()}
    if "calibration" in table:
        section = table["calibration"]
        for k, v in values.items():
            section[k] = v
    else:
        section = tomlkit.table()
        section.comment(f"written by dcmon calibrate on {time.strftime('%Y-%m-%d')}")
        for k, v in values.items():
            section[k] = v
        section.add(tomlkit.nl())
        table["calibration"] = section
    out = tomlkit.dumps(doc)
    try:
        st = p.stat()
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(out)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, st.st_mode & 0o7777)
            # keep the owner and group: /etc/dcmon/config.toml is root:dcmon 0640, and a file that became
            # root:root under `sudo dcmon calibrate` would lock the service out of its own config
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.chown(tmp, st.st_uid, st.st_gid)
                except PermissionError:
                    pass  # not root: the user may only edit a file they can write, so they own it or share its dir
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot write: {e.strerror}",
                          "run as a user that may edit the config (e.g. with sudo)") from None
