//! diesel table definitions, shared by both backends (same columns, basic types only).

diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        name -> Text,
        role -> Text,
        password_hash -> Text,
        disabled_at -> Nullable<BigInt>,
        failed_logins -> Integer,
        locked_until -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        user_id -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    refresh_tokens (token_hash) {
        token_hash -> Text,
        session_id -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
        used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        id -> Text,
        timestamp -> BigInt,
        actor -> Text,
        actor_id -> Nullable<Text>,
        event_type -> Text,
        resource_type -> Text,
        resource_id -> Nullable<Text>,
        change_request_id -> Nullable<Text>,
        request_id -> Nullable<Text>,
        payload -> Text,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::table! {
    connectors (id) {
        id -> Text,
        name -> Text,
        #[sql_name = "type"]
        connector_type -> Text,
        environment -> Text,
        settings -> Text,
        status -> Text,
        last_tested_at -> Nullable<BigInt>,
        last_test_error -> Nullable<Text>,
        last_discovered_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    connector_credentials (connector_id, name) {
        connector_id -> Text,
        name -> Text,
        sealed_value -> Text,
    }
}

diesel::table! {
    jobs (id) {
        id -> Text,
        kind -> Text,
        status -> Text,
        resource_type -> Text,
        resource_id -> Text,
        progress -> Text,
        result -> Text,
        error -> Nullable<Text>,
        created_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<BigInt>,
        attempts -> Integer,
    }
}

diesel::table! {
    assets (id) {
        id -> Text,
        connector_id -> Text,
        #[sql_name = "type"]
        asset_type -> Text,
        external_id -> Text,
        name -> Text,
        region -> Nullable<Text>,
        environment -> Text,
        attributes -> Text,
        first_seen_at -> BigInt,
        last_seen_at -> BigInt,
        removed_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    change_requests (id) {
        id -> Text,
        title -> Text,
        description -> Text,
        connector_id -> Nullable<Text>,
        change_type -> Text,
        target -> Text,
        state -> Text,
        risk -> Text,
        required_approvals -> Integer,
        approvals -> Text,
        rejection -> Nullable<Text>,
        requested_by -> Text,
        environment -> Text,
        applied_steps -> Integer,
        created_at -> BigInt,
        updated_at -> BigInt,
        submitted_at -> Nullable<BigInt>,
        decided_at -> Nullable<BigInt>,
        executed_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    change_request_journals (change_request_id, kind) {
        change_request_id -> Text,
        kind -> Text,
        job_id -> Text,
        body -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    change_request_secrets (change_request_id, name) {
        change_request_id -> Text,
        name -> Text,
        sealed_value -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    enrollment_tokens (id) {
        id -> Text,
        name -> Nullable<Text>,
        token_hash -> Text,
        expires_at -> BigInt,
        max_uses -> Integer,
        uses -> Integer,
        created_by -> Text,
        created_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    agents (id) {
        id -> Text,
        name -> Text,
        hostname -> Text,
        os -> Text,
        arch -> Text,
        version -> Text,
        labels -> Text,
        sealed_secret -> Text,
        enrollment_token_id -> Text,
        registered_at -> BigInt,
        last_heartbeat_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    agent_commands (id) {
        id -> Text,
        agent_id -> Text,
        change_request_id -> Nullable<Text>,
        job_id -> Nullable<Text>,
        step -> Text,
        command_type -> Text,
        params -> Text,
        status -> Text,
        output -> Nullable<Text>,
        sealed_snapshot -> Nullable<Text>,
        error -> Nullable<Text>,
        created_at -> BigInt,
        dispatched_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    agent_request_signatures (signature) {
        signature -> Text,
        agent_id -> Text,
        expires_at -> BigInt,
    }
}

diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(refresh_tokens -> sessions (session_id));
diesel::joinable!(connector_credentials -> connectors (connector_id));
diesel::joinable!(assets -> connectors (connector_id));
diesel::joinable!(agent_commands -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(
    users,
    sessions,
    refresh_tokens,
    audit_events,
    connectors,
    connector_credentials,
    jobs,
    assets,
    change_requests,
    change_request_journals,
    change_request_secrets,
    enrollment_tokens,
    agents,
    agent_commands,
    agent_request_signatures
);
