// The two numerical constants of the DMoL likelihood, owned by this file alone. dmol_math.h uses them
// in the kernel; hvae_dist/kernels/constants.py parses this file at import so that the Python reference
// uses the very same numbers (a second copy is how a kernel and its reference silently drift apart).
// Keep each one a plain `#define NAME <number>` line: that is what the Python side parses.
#pragma once

// Log-scales are clamped below at this value (PixelCNN++ / VDVAE): it keeps 1 / scale <= e^7 ~ 1100, so
// the logistic's arguments and gradients stay bounded when a network drives a scale towards zero.
#define DMOL_LOG_SCALE_MIN -7.0

// Interior bins use log(cdf_plus - cdf_min) only when the difference exceeds this; below it the
// difference has lost too many digits and the density at the bin centre times the bin width is used.
#define DMOL_CDF_DELTA_MIN 1e-5
