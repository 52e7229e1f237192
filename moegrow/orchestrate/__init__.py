"""The orchestrators: what a run does with the training machinery (`moegrow.train`). A config's
stages and what each is built from (`parts`), growth at a stage boundary (`boundary`), the run of
stages (`stages`), merging finished runs (`merging`), Branch-Train-MiX (`branching`) and the
config check (`validate`)."""
