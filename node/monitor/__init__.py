"""Model monitoring: per-job output statistics, drift alerts, shadow agreement and radiologist feedback."""
