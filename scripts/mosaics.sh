# `mosaics` (sourced by scripts/demo.sh): the demo's segmentation data, drawn once into $M/ade and converted to
# $M/training.beton and $M/validation.beton. $M/made_with records the arguments ($MOSAIC_ARGS) they are drawn with:
# mosaics of other arguments, or of unknown ones (an older demo's), are drawn again, and the segmentation runs in $T
# that learnt from them are removed, so that a rerun never reports a segmenter trained on other data. Both writers
# publish by rename, so a file that exists is whole and a rerun (after a kill) skips it; the record is written first,
# as it holds for every file drawn after it. Needs $PY, $M, $T, $MOSAIC_ARGS and `logged NAME CMD...`.
mosaics() {
  if [ -d "$M" ] && [ "$(cat "$M/made_with" 2>/dev/null)" != "$MOSAIC_ARGS" ]; then
    rm -rf "$M" "$T"/segment_*
  fi
  mkdir -p "$M" && echo "$MOSAIC_ARGS" > "$M/made_with"
  [ -f "$M/ade/classes.json" ] || logged mosaics $PY -m data_tools.mosaics "$M/ade" $MOSAIC_ARGS --force
  for split in training validation; do
    [ -f "$M/$split.beton" ] || logged convert_$split $PY -m data_tools.convert ade20k "$M/ade" "$M/$split.beton" \
      --split=$split --mode=raw --progress=false
  done
}
