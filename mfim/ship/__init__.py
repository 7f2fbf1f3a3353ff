"""Remaking the shipped checkpoints: a schedule (configs/ship/<file>.yaml) of phases run in order by the stages' own
functions (mfim.ship.runner), each phase's params the project's params.yaml plus the schedule's overrides."""
