"""The goal search: a job that states a goal gets the best model that meets it, or the evidence that none does."""
