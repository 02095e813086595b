"""The SIP redirect server: a carrier's switch sends an INVITE for a 700 number and gets a 302 to the real party
(or a final response saying why not), translated by the translation service over TranslateStream."""
