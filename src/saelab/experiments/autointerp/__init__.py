"""`saelab autointerp`: explain and score an SAE's latents with a chat model (detection, fuzzing), or compare two SAEs
by Mann-Whitney U tests as in the deep-SAE write-up, and write their feature pages (`run`, `pages`, `report`)."""
