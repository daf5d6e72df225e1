"""Reading runs: contribution and accuracy curves, feature geometry, HDF5 export, the
rank/beta sweep and TensorBoard logging. Plots use matplotlib's Agg canvas (no display)."""
