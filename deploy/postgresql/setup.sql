-- The registry of an iotflow fleet in PostgreSQL: one login role, one database, one schema.
-- Run once, as a superuser, with the role's password as a psql variable:
--
--   sudo -u postgres psql -v ON_ERROR_STOP=1 -v password="$(openssl rand -base64 24)" \
--        -f setup.sql
--
-- and give every instance  [registry] url = "postgresql://iotflow:${IOTFLOW_DB_PASSWORD}@db-host/iotflow"
-- (the password in /etc/iotflow/iotflow.env as IOTFLOW_DB_PASSWORD). See README.md here.
--
-- Least privilege: the role `iotflow` is no superuser, creates no roles or databases, and
-- owns nothing but the schema `iotflow` of database `iotflow`. It needs to own that schema
-- because iotflow applies its own migrations (`iotflow migrate`, and `run` at start).
-- Nobody else gets anything in that database.

\set ON_ERROR_STOP on
\if :{?password}
\else
    \echo 'setup.sql: give the role a password: psql -v password=... -f setup.sql'
    \quit
\endif

CREATE ROLE iotflow LOGIN PASSWORD :'password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    -- Each instance holds a pool of up to 10 connections plus one for LISTEN: 11 each.
    -- 64 leaves room for five instances, `iotflow migrate` runs and psql sessions.
    CONNECTION LIMIT 64;

-- Owned by the administrator, not by iotflow: the role can use the database but not
-- drop it, rename it or change who may connect.
CREATE DATABASE iotflow ENCODING 'UTF8' TEMPLATE template0;
REVOKE ALL ON DATABASE iotflow FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE iotflow TO iotflow;

\connect iotflow

-- PostgreSQL 15 already denies CREATE on `public` to PUBLIC; older versions do not.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
CREATE SCHEMA iotflow AUTHORIZATION iotflow;
-- iotflow writes unqualified table names: they land in, and are read from, its schema.
ALTER ROLE iotflow IN DATABASE iotflow SET search_path = iotflow;
