# geometry stage: rules to come (see the issue for this stage).
