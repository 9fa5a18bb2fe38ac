-- The store's schema as Base.metadata.create_all made it before Alembic (SQLite), for tests/test_store_migrations.py
CREATE TABLE commitments (
	transaction_uid VARCHAR(64) NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	dispatch_ids JSON NOT NULL, 
	attempt INTEGER NOT NULL, 
	requested_at FLOAT NOT NULL, 
	next_check_at FLOAT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	error TEXT, 
	expired_at FLOAT, 
	reported_at FLOAT, 
	reported_by VARCHAR(64), 
	committed JSON, 
	failed JSON, 
	PRIMARY KEY (transaction_uid)
);
CREATE TABLE dispatches (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	kind VARCHAR(8) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT NOT NULL, 
	last_error TEXT, 
	sent_at FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE finding_feedback (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	finding_number INTEGER NOT NULL, 
	verdict VARCHAR(16) NOT NULL, 
	value FLOAT, 
	reviewer VARCHAR(64), 
	recorded_at FLOAT NOT NULL, 
	audited_at FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE findings (
	job_id INTEGER NOT NULL, 
	number INTEGER NOT NULL, 
	tracking_id VARCHAR(64) NOT NULL, 
	finding_type VARCHAR(64) NOT NULL, 
	confidence FLOAT, 
	measurements JSON NOT NULL, 
	PRIMARY KEY (job_id, number), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE instances (
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	calling_ae VARCHAR(16), 
	received_at FLOAT NOT NULL, 
	PRIMARY KEY (sop_instance_uid), 
	FOREIGN KEY(series_uid) REFERENCES series (series_uid)
);
CREATE TABLE job_outputs (
	job_id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	rule VARCHAR(64) NOT NULL, 
	plugin VARCHAR(64) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	scanner VARCHAR(200) NOT NULL, 
	shadow INTEGER NOT NULL, 
	finding_count INTEGER NOT NULL, 
	recorded_at FLOAT NOT NULL, 
	PRIMARY KEY (job_id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	rule VARCHAR(64) NOT NULL, 
	plugin VARCHAR(64) NOT NULL, 
	plugin_version VARCHAR(32), 
	priority INTEGER NOT NULL, 
	series_uids JSON NOT NULL, 
	destinations JSON NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error TEXT, 
	summary TEXT, 
	timings JSON, 
	created_at FLOAT NOT NULL, 
	started_at FLOAT, 
	finished_at FLOAT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE TABLE model_versions (
	name VARCHAR(64) NOT NULL, 
	version VARCHAR(32) NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	first_used_at FLOAT NOT NULL, 
	PRIMARY KEY (name, version)
);
CREATE TABLE pseudonyms (
	id INTEGER NOT NULL, 
	kind VARCHAR(48) NOT NULL, 
	original VARCHAR(256) NOT NULL, 
	pseudonym VARCHAR(256) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	key_id VARCHAR(16) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE requests (
	id INTEGER NOT NULL, 
	action VARCHAR(32) NOT NULL, 
	job_id INTEGER, 
	study_uid VARCHAR(64), 
	requested_by VARCHAR(64), 
	requested_at FLOAT NOT NULL, 
	handled_at FLOAT, 
	outcome JSON, 
	PRIMARY KEY (id)
);
CREATE TABLE series (
	series_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16), 
	body_part VARCHAR(64), 
	description VARCHAR(64), 
	slice_thickness FLOAT, 
	instance_count INTEGER NOT NULL, 
	PRIMARY KEY (series_uid), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE TABLE shadow_agreements (
	shadow_job_id INTEGER NOT NULL, 
	primary_job_id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	shadow_model VARCHAR(100) NOT NULL, 
	primary_model VARCHAR(100) NOT NULL, 
	counts_equal INTEGER NOT NULL, 
	max_abs_diff FLOAT, 
	max_rel_diff FLOAT, 
	details JSON NOT NULL, 
	recorded_at FLOAT NOT NULL, 
	PRIMARY KEY (shadow_job_id), 
	FOREIGN KEY(shadow_job_id) REFERENCES jobs (id)
);
CREATE TABLE studies (
	study_uid VARCHAR(64) NOT NULL, 
	patient_id VARCHAR(64), 
	accession_number VARCHAR(16), 
	study_description VARCHAR(64), 
	calling_ae VARCHAR(16), 
	state VARCHAR(32) NOT NULL, 
	instance_count INTEGER NOT NULL, 
	revision INTEGER NOT NULL, 
	first_received_at FLOAT NOT NULL, 
	last_received_at FLOAT NOT NULL, 
	completed_at FLOAT, 
	completion_reason VARCHAR(32), 
	routed_at FLOAT, 
	PRIMARY KEY (study_uid)
);
CREATE INDEX ix_commitments_state ON commitments (state, next_check_at);
CREATE INDEX ix_dispatch_due ON dispatches (state, next_attempt_at);
CREATE INDEX ix_dispatches_job_id ON dispatches (job_id);
CREATE INDEX ix_finding_feedback_audited_at ON finding_feedback (audited_at);
CREATE INDEX ix_finding_feedback_job_id ON finding_feedback (job_id);
CREATE INDEX ix_instances_series_uid ON instances (series_uid);
CREATE INDEX ix_instances_study_uid ON instances (study_uid);
CREATE INDEX ix_job_outputs_model ON job_outputs (model);
CREATE INDEX ix_job_outputs_study_uid ON job_outputs (study_uid);
CREATE INDEX ix_jobs_claim ON jobs (state, priority, id);
CREATE INDEX ix_jobs_study_uid ON jobs (study_uid);
CREATE INDEX ix_pseudonym_lookup ON pseudonyms (kind, pseudonym);
CREATE INDEX ix_pseudonyms_study_uid ON pseudonyms (study_uid);
CREATE INDEX ix_requests_handled_at ON requests (handled_at);
CREATE INDEX ix_series_study_uid ON series (study_uid);
CREATE INDEX ix_shadow_agreements_primary_job_id ON shadow_agreements (primary_job_id);
CREATE INDEX ix_studies_state ON studies (state);
CREATE UNIQUE INDEX uq_pseudonym_pair ON pseudonyms (kind, study_uid, original, pseudonym);
