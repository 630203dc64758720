"""Programs built on the fnemm library (as open_clip_train is on open_clip): the demo,
the FNE study, the MOE stability study, paper-style reports, contact sheets and the
statistics they share. The library never imports them; the CLI does."""
