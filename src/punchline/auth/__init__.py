"""The login server: accounts, the certificate authority, node enrolment, the bootstrap list."""
