"""Retrieval indexes: rag_indexes and rag_chunks (tidyllm.apps.Index).

Why: a RAG index keeps its chunks, citations and embedding calls in the mart, so it is governed, costed
and inspectable like everything else, and re-embeds only chunks whose text hash changed. The vectors
themselves live in one table per index (sqlite-vec ``vec0`` or pgvector), created on first use because
their type depends on the embedding's dimensions.

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rag_indexes',
    sa.Column('name', sa.String(length=200), nullable=False, comment='index name given to tidyllm.apps.Index'),
    sa.Column('embedding_model', sa.String(length=300), nullable=False, comment='gateway embedding route or group the index embeds with (queries must use the same)'),
    sa.Column('dimensions', sa.Integer(), nullable=True, comment='length of the vectors; set by the first embedding'),
    sa.Column('backend', sa.String(length=20), nullable=False, comment='vector store: sqlite-vec or pgvector'),
    sa.Column('vector_table', sa.String(length=100), nullable=False, comment='table holding the vectors (created on first use: its type depends on the dimensions)'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='UTC creation time'),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time of the last add()'),
    sa.PrimaryKeyConstraint('name'),
    comment='Retrieval (RAG) indexes: which embedding model and vector table each one uses.'
    )
    op.create_table('rag_chunks',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False, comment='chunk row id; the key of its vector in the index\'s vector table'),
    sa.Column('index_name', sa.String(length=200), nullable=False, comment='the index'),
    sa.Column('document', sa.String(length=1000), nullable=False, comment='document name the chunk comes from'),
    sa.Column('chunk_key', sa.String(length=64), nullable=False, comment="hash of (document, section, first paragraph): the chunk's place, stable across edits"),
    sa.Column('location', sa.String(length=1000), nullable=False, comment='citation: document, page, section, paragraphs'),
    sa.Column('section', sa.Text(), nullable=True, comment='heading path of the chunk'),
    sa.Column('page', sa.Integer(), nullable=True, comment='first page (PDF)'),
    sa.Column('text', sa.Text(), nullable=False, comment="the chunk's text, as embedded"),
    sa.Column('text_hash', sa.String(length=64), nullable=False, comment='SHA-256 of the text: a chunk whose hash is unchanged is not embedded again'),
    sa.Column('tokens', sa.Integer(), nullable=True, comment='cl100k_base tokens of the text'),
    sa.Column('call_id', sa.String(length=64), nullable=True, comment='llm_calls.id of the embedding call that produced its vector'),
    sa.Column('execution_id', sa.String(length=36), nullable=True, comment='executions.id of the add() run that embedded it'),
    sa.Column('embedded_at', sa.DateTime(timezone=True), nullable=False, comment='UTC time it was embedded'),
    sa.ForeignKeyConstraint(['index_name'], ['rag_indexes.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('index_name', 'document', 'chunk_key', name='uq_rag_chunks_place'),
    comment='Chunks of the documents in each retrieval index, with their citations and embedding calls.'
    )


def downgrade() -> None:
    op.drop_table('rag_chunks')
    op.drop_table('rag_indexes')
