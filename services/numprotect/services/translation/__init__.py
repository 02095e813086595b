"""The translation service: The call-setup hot path: whom a call to a 700 number connects to."""
