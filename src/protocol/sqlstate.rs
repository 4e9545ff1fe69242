//! The SQLSTATE codes pgnear itself emits, typed so they cannot be misspelt.

/// An SQLSTATE that pgnear can put in an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlState {
    /// 08P01
    ProtocolViolation,
    /// 08006
    ConnectionFailure,
    /// 08001
    SqlclientUnableToEstablishSqlconnection,
    /// 28000
    InvalidAuthorizationSpecification,
    /// 28P01
    InvalidPassword,
    /// 53300
    TooManyConnections,
    /// 57P01
    AdminShutdown,
    /// 57P05 (PostgreSQL's idle_session_timeout)
    IdleSessionTimeout,
    /// 0A000
    FeatureNotSupported,
    /// 22023
    InvalidParameterValue,
    /// 42704
    UndefinedObject,
    /// 25006
    ReadOnlySqlTransaction,
    /// 25P02
    InFailedSqlTransaction,
    /// 40001
    SerializationFailure,
    /// 55000 (PostgreSQL's for a currval() not yet defined in the session)
    ObjectNotInPrerequisiteState,
    /// 57P03
    CannotConnectNow,
    /// 42501
    InsufficientPrivilege,
    /// 42601
    SyntaxError,
    /// 58000
    SystemError,
    /// XX000
    InternalError,
}

impl SqlState {
    /// The five-character code.
    pub fn code(self) -> &'static str {
        match self {
            SqlState::ProtocolViolation => "08P01",
            SqlState::ConnectionFailure => "08006",
            SqlState::SqlclientUnableToEstablishSqlconnection => "08001",
            SqlState::InvalidAuthorizationSpecification => "28000",
            SqlState::InvalidPassword => "28P01",
            SqlState::TooManyConnections => "53300",
            SqlState::AdminShutdown => "57P01",
            SqlState::IdleSessionTimeout => "57P05",
            SqlState::FeatureNotSupported => "0A000",
            SqlState::InvalidParameterValue => "22023",
            SqlState::UndefinedObject => "42704",
            SqlState::ReadOnlySqlTransaction => "25006",
            SqlState::InFailedSqlTransaction => "25P02",
            SqlState::SerializationFailure => "40001",
            SqlState::ObjectNotInPrerequisiteState => "55000",
            SqlState::CannotConnectNow => "57P03",
            SqlState::InsufficientPrivilege => "42501",
            SqlState::SyntaxError => "42601",
            SqlState::SystemError => "58000",
            SqlState::InternalError => "XX000",
        }
    }
}
