"""ihd: intracranial hemorrhage detection on head CT, a CNN on slices and a BiLSTM over each series."""
