"""The compiler: the compile driver, host-side module preparation, padding check, tuner, artifact writer and signing."""
